"""Random query patches of UP-DETR pre-training: where they are cut (:func:`sample_patch_boxes`) and how
they are augmented (:func:`augment_query_patches`, :class:`PatchAugmentation`); docs/method.md §1 "Data".

Patch boxes follow the paper's code exactly (NumPy ``randint``, high bound exclusive), in pixels
of the original image of width ``w`` and height ``h``::

    side_w ~ U{min, ..., w - min}      x ~ U{0, ..., w - side_w - 1}
    side_h ~ U{min, ..., h - min}      y ~ U{0, ..., h - side_h - 1}
    box_xyxy_px = [x, y, x + side_w, y + side_h]

so a patch never touches the last row or column (docs/method.md §7.8). ``pretrain.max_patch_size`` (not in the
paper) caps the sides: with one size for every patch, a patch's resampling (a small crop enlarged to the query
size looks blurred, a large one shrunk looks sharp) no longer tells the decoder how large its box is. The augmentation is
SimCLR-style without flipping: colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale with
p = 0.2, Gaussian blur sigma ~ U[0.1, 2.0] with p = 0.5.

Speed: each patch runs through its whole augmentation chain while it is in cache: NumPy ufuncs
on a view of its memory (about half the per-call cost of a torch op, which dominates on
128 x 128 planes) with reused work buffers, closed-form arithmetic for the hue rotation, and
two matrix products for the blur.

Randomness: every draw comes from the ``numpy.random.Generator`` passed in, never from global state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["PatchAugmentation", "augment_query_patches", "sample_patch_boxes"]


def sample_patch_boxes(height: int, width: int, num_patches: int, min_size: int, rng: np.random.Generator,
                       max_size: int = 0) -> Tensor:
    """M random patch boxes, int64 (M, 4) xyxy pixels of a (height, width) image.

    With ``max_size`` 0, exactly the paper's ``get_random_patch_from_img`` (see the module docstring); needs
    ``width, height >= 2 * min_size``. A positive ``max_size`` caps each side at that many pixels (sides then
    drawn from ``min_size .. min(max_size, w - min_size)``; ``max_size == min_size`` gives squares of one size).
    """
    high_w = width - min_size if max_size <= 0 else min(max_size, width - min_size)
    high_h = height - min_size if max_size <= 0 else min(max_size, height - min_size)
    side_w = rng.integers(min_size, high_w + 1, size=num_patches)
    side_h = rng.integers(min_size, high_h + 1, size=num_patches)
    x = rng.integers(0, width - side_w)  # (M,), high exclusive as in np.random.randint
    y = rng.integers(0, height - side_h)
    return torch.from_numpy(np.stack([x, y, x + side_w, y + side_h], axis=1).astype(np.int64))


def augment_query_patches(patches: Tensor, rng: np.random.Generator) -> Tensor:
    """SimCLR-style augmentation of (M, 3, q, q) float patches in [0, 1], no flip; in place.

    Per patch, independently and in this order (the paper's query-patch transform):

    1. with p = 0.8 ``ColorJitter(0.4, 0.4, 0.4, 0.1)``: brightness, contrast and saturation
       factors ~ U[0.6, 1.4], hue shift ~ U[-0.1, 0.1] of a turn, applied in a random order
       as torchvision does, each clipped to [0, 1];
    2. with p = 0.2 grayscale (ITU-R 601-2 luma, as PIL's ``convert("L")``), three channels;
    3. with p = 0.5 Gaussian blur, sigma ~ U[0.1, 2.0] pixels, reflected borders.
    """
    augmentation = PatchAugmentation.draw(patches.shape[0], rng)
    for i, patch in enumerate(patches):
        augmentation.apply(patch, i)
    return patches


@dataclass
class PatchAugmentation:
    """Random parameters of :func:`augment_query_patches` for M patches (vectors of length M).

    Drawing them all first and then running each patch through its whole chain on its own
    keeps a (3, q, q) patch in the CPU's L2 cache: several times faster than applying each
    step to the stacked (M, 3, q, q) patches, and the per-patch parameters need no masking.
    The elementwise steps run as NumPy ufuncs on a view of the patch's memory: on a
    128 x 128 plane the work is a few microseconds, and a ufunc call costs about half of a
    torch op's dispatch, which dominates here.
    """

    jitter: np.ndarray  # bool, colour jitter applied
    order: np.ndarray  # (M, 4) int, a random permutation of the jitter ops (_JITTER_OPS indices)
    factors: np.ndarray  # (M, 4) float: brightness, contrast, saturation factors, hue shift
    gray: np.ndarray  # bool
    blur: np.ndarray  # bool
    sigma: np.ndarray  # float, blur sigma in pixels
    _kernels: dict[int, Tensor] | None = field(default=None, init=False, repr=False)

    @classmethod
    def draw(cls, m: int, rng: np.random.Generator) -> "PatchAugmentation":
        jitter = rng.random(m) < 0.8
        order = rng.random((m, 4)).argsort(axis=1)
        factors = np.stack([
            rng.uniform(0.6, 1.4, m),  # brightness
            rng.uniform(0.6, 1.4, m),  # contrast
            rng.uniform(0.6, 1.4, m),  # saturation
            rng.uniform(-0.1, 0.1, m),  # hue
        ], axis=1)  # (M, 4)
        gray = rng.random(m) < 0.2
        blur = rng.random(m) < 0.5
        sigma = rng.uniform(0.1, 2.0, m)
        return cls(jitter, order, factors, gray, blur, sigma)

    def apply(self, patch: Tensor, i: int) -> None:
        """Augment ``patch`` (3, q, q) float32 in [0, 1], in place, with the parameters of patch i."""
        x = patch.numpy()  # shares the memory
        if self.jitter[i]:
            for op in self.order[i].tolist():
                _JITTER_OPS[op](x, float(self.factors[i, op]))
        if self.gray[i]:
            plane = _luma(x)  # (q, q); blurring it once equals blurring three equal channels
            if self.blur[i]:
                plane = self._blurred(torch.from_numpy(plane)[None], i)[0].numpy()
            np.copyto(x, plane)  # broadcast to the three channels
        elif self.blur[i]:
            if patch.is_contiguous():
                self._blurred(patch, i, out=patch)
            else:
                patch.copy_(self._blurred(patch, i))

    def _blurred(self, x: Tensor, i: int, out: Tensor | None = None) -> Tensor:
        kernel = self._blur_kernel(i, x.shape[-1])  # (q, q)
        return torch.matmul(torch.matmul(kernel, x), kernel.T, out=out)  # vertical, then horizontal pass

    def _blur_kernel(self, i: int, size: int) -> Tensor:
        if self._kernels is None:  # built for every blurred patch at once (fewer, larger ops)
            blurred = np.flatnonzero(self.blur)
            kernels = _blur_matrices(size, torch.from_numpy(self.sigma[blurred]).float())  # (k, q, q)
            self._kernels = dict(zip(blurred.tolist(), kernels))
        return self._kernels[i]


# The colour kernels work in place on a float32 (3, q, q) ndarray in [0, 1] (any strides).


def _luma(x: np.ndarray) -> np.ndarray:
    """(q, q) luma of a (3, q, q) RGB patch, PIL's weights."""
    return np.matmul(_LUMA_WEIGHTS, x.reshape(3, -1)).reshape(x.shape[1:])


# Each jitter op is torchvision's on a float image: a blend clipped to [0, 1]. The clip is
# skipped where it cannot change anything (factor <= 1 blends values that are in [0, 1]).


def _brightness(x: np.ndarray, factor: float) -> None:
    np.multiply(x, np.float32(factor), out=x)
    if factor > 1.0:
        np.minimum(x, np.float32(1.0), out=x)


def _contrast(x: np.ndarray, factor: float) -> None:
    pixels = x.reshape(3, -1)
    mean = float(_LUMA_WEIGHTS @ (pixels @ _ones(pixels.shape[1]))) / pixels.shape[1]  # mean luma (BLAS sums)
    np.multiply(x, np.float32(factor), out=x)
    np.add(x, np.float32((1.0 - factor) * mean), out=x)
    if factor > 1.0:
        np.clip(x, np.float32(0.0), np.float32(1.0), out=x)


def _saturation(x: np.ndarray, factor: float) -> None:
    luma = _luma(x)
    np.multiply(luma, np.float32(1.0 - factor), out=luma)
    np.multiply(x, np.float32(factor), out=x)
    np.add(x, luma, out=x)
    if factor > 1.0:
        np.clip(x, np.float32(0.0), np.float32(1.0), out=x)


def _hue(x: np.ndarray, shift: float) -> None:
    """Rotate the HSV hue of a (3, q, q) patch by ``shift`` turns (torchvision's ``adjust_hue``).

    The RGB -> HSV -> RGB round trip in closed form, with arithmetic only (NumPy's masked
    selections are branchy and ~20x slower on mixed masks). Rotation keeps the max and min
    channel values (V and V - chroma) and moves the hue; with the hue in sextants (red 0,
    green 2, blue 4) and d_c its distance from channel c's centre, channel c is
    ``min + chroma * clamp(2 - d_c, 0, 1)``. Matches ``adjust_hue`` to 1e-6, ties between
    channels included (red, then green counts as the max, as in torchvision).
    """
    r, g, b = x
    maxc, minc, chroma, is_r, is_g, total, hue, tmp = _scratch(r.shape, 8)
    np.maximum(r, g, out=maxc)
    np.maximum(maxc, b, out=maxc)
    np.minimum(r, g, out=minc)
    np.minimum(minc, b, out=minc)
    np.subtract(maxc, minc, out=chroma)
    # 0/1 masks of the largest channel, ties broken red > green (> blue).
    np.equal(r, maxc, out=is_r)
    np.equal(g, maxc, out=is_g)
    is_g -= is_r
    np.maximum(is_g, _ZERO, out=is_g)
    # chroma * hue = is_r (g - b) + is_g (2 chroma + b - r) + is_b (4 chroma + r - g), is_b = 1 - is_r - is_g:
    np.add(r, g, out=total)
    total += b
    np.subtract(r, g, out=hue)
    np.multiply(g, _MINUS_3, out=tmp)
    tmp += total
    tmp *= is_r
    hue -= tmp  # r - g - is_r (r + b - 2 g)
    np.multiply(r, _MINUS_3, out=tmp)
    tmp += total
    tmp *= is_g
    hue += tmp  # ... + is_g (g + b - 2 r)
    np.maximum(chroma, _TINY, out=tmp)
    hue /= tmp  # 0 where gray
    is_r += is_r
    is_r += is_g
    is_r += is_r
    hue -= is_r  # hue - 4 in sextants, in [-5, 1]: offsets 0 (red), 2 (green), 4 (blue), minus 4
    # a_c = |hue + 6 shift - centre_c| is in [0, 6] (hue + 6 shift in (-1.6, 5.6)), so
    # 3 - d_c = |3 - a_c| and min + chroma * clamp(2 - d_c, 0, 1) = (min - chroma) + chroma * clamp(|a_c - 3|, 1, 2).
    v = _scratch(x.shape, 1)[0]
    np.subtract(hue, _SEXTANT_CENTRES - np.float32(4.0 + 6.0 * shift), out=v)  # (3, q, q)
    np.abs(v, out=v)
    v -= _THREE
    np.abs(v, out=v)
    np.clip(v, _ONE, _TWO, out=v)
    v *= chroma
    minc -= chroma
    np.add(v, minc, out=x)


_ZERO, _ONE, _TWO, _THREE, _MINUS_3, _TINY = (np.float32(v) for v in (0.0, 1.0, 2.0, 3.0, -3.0, 1e-12))
_SCRATCH = threading.local()


def _ones(n: int) -> np.ndarray:
    ones = _SCRATCH.__dict__.setdefault("ones", {})
    if n not in ones:
        ones[n] = np.ones(n, dtype=np.float32)
    return ones[n]


def _scratch(shape: tuple[int, ...], n: int) -> np.ndarray:
    """(n, *shape) float32 work buffers, reused: fresh arrays over 128 kB would be mmap'ed and page-faulted every call."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (shape, n)
    if key not in buffers:
        buffers[key] = np.empty((n, *shape), dtype=np.float32)
    return buffers[key]


_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_SEXTANT_CENTRES = np.array([0.0, 2.0, 4.0], dtype=np.float32).reshape(3, 1, 1)
_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)  # torchvision's ColorJitter op indices


def _blur_matrices(size: int, sigma: Tensor) -> Tensor:
    """(k, size, size) matrices A with ``A @ signal`` = Gaussian blur of a 1-d signal (one per sigma).

    A blur of a (3, q, q) patch is then two matrix products (``A @ x @ A.T``), which BLAS runs
    faster on CPU than a depthwise convolution. Borders are reflected without repeating the
    edge (torch's ``"reflect"`` padding): source s sits at p = s, p = -s and p = 2 (size - 1) - s,
    so A is one Toeplitz plus two Hankel matrices of the 1-d Gaussian, each a strided view of
    a vector. The Gaussian is floored at exp(-46) ~ 1e-20 (denormal weights would make the
    products ~100x slower), which it reaches within 9.6 sigma.
    """
    k, n = sigma.shape[0], 2 * size - 1
    offsets = torch.arange(n, dtype=torch.float32)
    gauss = (offsets.square() * (-0.5 / sigma.square()).view(k, 1)).clamp_(min=-46.0).exp_()  # (k, n): g(d)
    gauss /= 2.0 * gauss.sum(dim=1, keepdim=True) - gauss[:, :1]  # g(-d) .. g(d) sums to 1
    centred = torch.cat([gauss[:, 1:size].flip(1), gauss[:, :size]], dim=1)  # (k, n): g(j - (size - 1))
    matrix = centred.as_strided((k, size, size), (n, 1, 1)).flip(1)  # g(s - i), a copy
    matrix[:, :, 1:] += gauss.as_strided((k, size, size - 1), (n, 1, 1), 1)  # g(i + s), s >= 1
    matrix[:, :, :-1] += gauss.flip(1).as_strided((k, size, size - 1), (n, 1, 1))  # g(2 (size - 1) - i - s)
    if 9.6 * float(sigma.max()) > size - 1:  # mass beyond one reflection is lost: renormalise rows
        matrix /= matrix.sum(dim=2, keepdim=True)
    return matrix
