"""Unlabelled images and random query patches for UP-DETR pre-training (docs/method.md §1 "Data").

Every sample is one image of a folder tree (labels are never used) with M random query
patches cut from it. Patch boxes follow the paper's code exactly (NumPy ``randint``, high
bound exclusive), in pixels of the original image of width ``w`` and height ``h``::

    side_w ~ U{min, ..., w - min}      x ~ U{0, ..., w - side_w - 1}
    side_h ~ U{min, ..., h - min}      y ~ U{0, ..., h - side_h - 1}
    box_xyxy_px = [x, y, x + side_w, y + side_h]

so a patch never touches the last row or column (docs/method.md §7.8). Each patch is the crop of
its box from the original image, resized to ``query_size`` x ``query_size`` (aspect ratio
not kept), then augmented SimCLR-style without flipping: colour jitter (0.4, 0.4, 0.4, 0.1)
with p = 0.8, grayscale with p = 0.2, Gaussian blur sigma ~ U[0.1, 2.0] with p = 0.5, then
ImageNet normalisation. The image itself is resized (shortest side drawn from ``scales``,
longest <= ``max_size``, no flip) and normalised.

Speed (``benchmarks/pretrain_data.py`` compares with the paper's PIL pipeline): the image is
decoded once to ``uint8`` (libjpeg-turbo for JPEG), each crop is resized with torch's
antialiased ``uint8`` kernel (the same filter as PIL's bilinear resize), and each patch then
runs through its whole augmentation chain while it is in cache: NumPy ufuncs on a view of
its memory (about half the per-call cost of a torch op, which dominates on 128 x 128
planes) with reused work buffers, closed-form arithmetic for the hue rotation, and two
matrix products for the blur. The image is converted and normalised in row blocks that
stay in cache between the two passes.

Randomness: every draw of a sample comes from one ``numpy.random.Generator`` seeded by
``(seed, epoch, index)``, never from global state. DataLoader workers therefore never repeat
each other's crops (the paper's code used ``np.random`` in workers, docs/method.md §7.7), a sample
is reproducible, and resuming at any (epoch, index) gives the same data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from updetr.box_ops import xyxy_px_to_normalized_cxcywh
from updetr.data.collate import collate_with_patches
from updetr.data.io import IMAGE_EXTENSIONS, DataError, cache_folder, image_size_from_bytes, load_image, walk_tree
from updetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resized_size
from updetr.structures import ImageBatch, Target

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without its (deprecated) image decoders: Pillow decodes everything
    decode_jpeg = None

if TYPE_CHECKING:
    from updetr.config import Config

__all__ = [
    "PatchAugmentation", "UnlabeledImages", "augment_query_patches", "collate_pretrain", "sample_patch_boxes",
    "scan_images",
]

logger = logging.getLogger(__name__)

_CACHE_HEADER = "# updetr image list v2"
_RACY_NS = 2_000_000_000  # a folder changed this close to the scan may change again unseen (coarse mtimes)
_MAX_WARNINGS = 10  # skipped files logged one by one per process; later ones are only counted


# --------------------------------------------------------------------------- folder scanning


def scan_images(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, refresh: bool = False) -> list[str]:
    """Every image file under ``root`` (recursive, symlinks followed, loops skipped), sorted.

    Image files are those with an extension of ``updetr.data.io.IMAGE_EXTENSIONS``
    (case-insensitive); the walk is ``updetr.data.io.walk_tree``. The list is cached so that
    restarting on ImageNet does not walk 1.28M files again, in ``cache_dir`` or else
    ``updetr.data.io.cache_folder()/image-lists`` (never in ``root``), one file per root. The
    cache stores the modification time of every folder it walked and is used only while all
    of them are unchanged: adding, removing or renaming a file or folder anywhere in the tree
    (or re-pointing a link) makes the next call walk it again. Checking costs one ``stat`` per
    folder. ``refresh=True`` walks the tree regardless.

    Returns:
        Absolute paths.

    Raises:
        DataError: ``root`` is not a folder or holds no image file.
    """
    root_abs = os.path.abspath(os.fspath(root))
    return [os.path.join(root_abs, p) for p in _scan_relative(root_abs, cache_dir, refresh)]


def image_list_cache(root_abs: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file of :func:`scan_images` for the folder ``root_abs``."""
    key = hashlib.sha1(root_abs.encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else cache_folder() / "image-lists"
    return folder / f"images-{key}.txt"


def _scan_relative(root_abs: str, cache_dir: str | os.PathLike | None, refresh: bool) -> list[str]:
    """:func:`scan_images`, paths relative to ``root_abs``."""
    if not os.path.isdir(root_abs):
        raise DataError(f"{root_abs}: image folder not found")
    cache = image_list_cache(root_abs, cache_dir)
    if not refresh:
        relative = _read_cache(cache, root_abs)
        if relative is not None:
            return relative
    scanned_ns = time.time_ns()
    folders, relative = _walk_images(root_abs)
    if not relative:
        raise DataError(f"{root_abs}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder tree")
    try:
        _write_cache(cache, root_abs, scanned_ns, folders, relative)
    except OSError as err:
        logger.info("cannot write the image list cache %s (%s); the folder will be walked again next time", cache, err)
    return relative


def _walk_images(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(every folder walked with its mtime in ns, sorted image paths), relative to ``root``."""
    folders, found = [], []
    for relative_dir, mtime_ns, filenames in walk_tree(root):
        folders.append((relative_dir, mtime_ns))
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and "\n" not in name:  # one path a line
                found.append(os.path.normpath(os.path.join(relative_dir, name)))
    return folders, sorted(found)


def _read_cache(cache: Path, root_abs: str) -> list[str] | None:
    """The cached list, or None when there is none, it is for another root, or the tree changed."""
    try:
        lines = cache.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if len(lines) < 3 or lines[0] != _CACHE_HEADER or lines[1] != f"root {root_abs}" or not lines[2].startswith("scanned "):
        return None
    try:
        scanned_ns = int(lines[2].removeprefix("scanned "))
        relative = []
        for line in lines[3:]:
            kind, _, rest = line.partition(" ")
            if kind == "d":
                mtime, _, folder = rest.partition(" ")
                if int(mtime) >= scanned_ns - _RACY_NS or os.stat(os.path.join(root_abs, folder)).st_mtime_ns != int(mtime):
                    return None  # changed since (or too close to) the scan
            elif kind == "f":
                relative.append(rest)
            else:
                return None
    except (ValueError, OSError):
        return None
    return relative or None


def _write_cache(cache: Path, root_abs: str, scanned_ns: int, folders: list[tuple[str, int]], relative: list[str]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=cache.name, suffix=".tmp", dir=cache.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{_CACHE_HEADER}\nroot {root_abs}\nscanned {scanned_ns}\n")
            f.writelines(f"d {mtime} {folder}\n" for folder, mtime in folders)
            f.writelines(f"f {path}\n" for path in relative)
        os.replace(tmp, cache)  # atomic: readers see the old list or the whole new one
    except BaseException:
        os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- patch sampling


def sample_patch_boxes(height: int, width: int, num_patches: int, min_size: int, rng: np.random.Generator) -> Tensor:
    """M random patch boxes, int64 (M, 4) xyxy pixels of a (height, width) image.

    Exactly the paper's ``get_random_patch_from_img`` (see the module docstring); needs
    ``width, height >= 2 * min_size``.
    """
    side_w = rng.integers(min_size, width - min_size + 1, size=num_patches)
    side_h = rng.integers(min_size, height - min_size + 1, size=num_patches)
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


# --------------------------------------------------------------------------- dataset


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_INV_STD = 1.0 / torch.tensor(IMAGENET_STD).view(3, 1, 1)
_SCALE_255 = _INV_STD / 255.0
_MEAN_OVER_STD = _MEAN * _INV_STD
_INV_255 = np.float32(1.0 / 255.0)
_CHUNK = 1 << 15
_MEAN_NP = _MEAN.numpy()
_INV_STD_NP = _INV_STD.numpy()
_SCALE_255_NP = _SCALE_255.numpy()
_MEAN_OVER_STD_NP = _MEAN_OVER_STD.numpy()
_PAPER_SCALES = (320, 336, 352, 368, 384, 400, 416, 432, 448, 464, 480)


class UnlabeledImages(Dataset):
    """Images of a folder tree with M random query patches each (UP-DETR pre-training).

    ``dataset[i]`` is ``(image, target, patches)``:

    - ``image``: float (3, H, W), resized and normalised with ImageNet mean/std;
    - ``target``: ``boxes_cxcywh`` float (M, 4) of the patches in the image (normalised),
      ``labels`` int64 (M,) zeros (one class), ``patch_index`` int64 (M,) ``arange(M)``
      (box m is where patch m came from), ``image_id`` int64 scalar (index in ``files`` of
      the image used), ``orig_size`` and ``size`` int64 (2,) (height, width) before and after
      resizing, ``area`` float (M,) patch area in original pixels, ``iscrowd`` int64 zeros;
    - ``patches``: float (M, 3, q, q) query patches, normalised with ImageNet mean/std.

    Files that cannot be decoded and images whose width or height is ``<= 2 *
    min_patch_size`` (the paper's ``w <= 16`` rule) are skipped: the next usable file (in
    ``files`` order, wrapping around) takes their place and ``skipped`` counts them by reason
    (``"unreadable"``, ``"too_small"``). Counts are per process (each DataLoader worker keeps
    its own).

    The sample depends only on ``(seed, epoch, index)``; call :meth:`set_epoch` before each
    epoch's DataLoader iterator is created (persistent workers keep the epoch they started with).

    The default ``scales`` are the paper's range (§4: shortest side in [320, 480], step 16);
    the authors' code list omits 384 (docs/method.md §1). ``augment=False`` leaves the patches as
    the resized crops (for tests and inspection).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        num_patches: int = 10,
        query_size: int = 128,
        min_patch_size: int = 8,
        scales: Sequence[int] = _PAPER_SCALES,
        max_size: int | None = 600,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        augment: bool = True,
    ) -> None:
        for name, value in (("num_patches", num_patches), ("query_size", query_size), ("min_patch_size", min_patch_size)):
            if value <= 0:
                raise ValueError(f"{name}={value} must be > 0")
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales={scales} must be a non-empty list of positive sizes")
        self.root = os.path.abspath(os.fspath(root))
        self.num_patches = num_patches
        self.query_size = query_size
        self.min_patch_size = min_patch_size
        self.scales = tuple(int(s) for s in scales)
        self.max_size = max_size
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        # Relative paths in one fixed-width bytes array, not a list of 1.28M Python strings:
        # reading it in DataLoader workers does not touch (and so copy) per-object refcounts.
        self._relative = np.array([os.fsencode(p) for p in _scan_relative(self.root, cache_dir, False)])
        self.skipped: Counter[str] = Counter()
        self._bad: dict[int, str] = {}  # file index -> reason, so a bad file is decoded once

    @classmethod
    def from_config(cls, cfg: "Config", *, cache_dir: str | os.PathLike | None = None) -> "UnlabeledImages":
        """Build from ``cfg.data`` (``images``, ``scales``, ``max_size``), ``cfg.pretrain`` and ``cfg.seed``.

        ``cfg.data.scales`` / ``max_size`` are used as they are: a pre-training config sets them
        to the paper's values (this class's defaults), not DETR's fine-tuning 480-800 / 1333.
        """
        return cls(
            cfg.data.images,
            num_patches=cfg.pretrain.num_patches,
            query_size=cfg.pretrain.query_size,
            min_patch_size=cfg.pretrain.min_patch_size,
            scales=cfg.data.scales,
            max_size=cfg.data.max_size,
            seed=cfg.seed,
            cache_dir=cache_dir,
        )

    def __len__(self) -> int:
        return len(self._relative)

    @property
    def files(self) -> list[str]:
        """Absolute paths of the images, sorted."""
        return [self.file(i) for i in range(len(self))]

    def file(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self._relative[index]))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self, index: int) -> np.random.Generator:
        """The generator of every random draw of sample ``index`` in the current epoch."""
        mask = (1 << 64) - 1  # SeedSequence takes non-negative integers
        return np.random.default_rng([self.seed & mask, self.epoch & mask, int(index) & mask])

    def __getitem__(self, index: int) -> tuple[Tensor, Target, Tensor]:
        return self.sample(index)  # type: ignore[return-value]

    def sample(self, index: int, *, with_image: bool = True) -> tuple[Tensor | None, Target, Tensor]:
        """Sample ``index`` of the current epoch; ``with_image=False`` skips resizing and normalising
        the image (``None`` in its place; for cached image features) and draws the same patches."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        file_index, pixels = self._load_usable(index)  # uint8 (3, h, w)
        rng = self.generator(index)
        height, width = pixels.shape[-2:]
        boxes_xyxy_px = sample_patch_boxes(height, width, self.num_patches, self.min_patch_size, rng)  # (M, 4)
        new_hw = resized_size(height, width, self.scales[rng.integers(len(self.scales))], self.max_size)

        q = self.query_size
        # First everything that reads the decoded image, while it is in cache: the crops
        # (copied to contiguous channels-last tensors: torch's fast uint8 antialiased resize
        # needs one, and on the strided view it takes a path twice as slow) and the image.
        crops = [
            nnf.interpolate(pixels[None, :, y0:y1, x0:x1].contiguous(memory_format=torch.channels_last),
                            size=(q, q), mode="bilinear", antialias=True)[0]  # uint8 (3, q, q)
            for x0, y0, x1, y1 in boxes_xyxy_px.tolist()
        ]
        image_uint8 = F.resize(pixels, list(new_hw), antialias=True) if with_image else None  # (3, H, W)

        augmentation = PatchAugmentation.draw(self.num_patches, rng) if self.augment else None
        patches = torch.empty(self.num_patches, 3, q, q)  # (M, 3, q, q)
        for i, (patch, crop) in enumerate(zip(patches, crops)):  # each patch's chain while it is in cache
            x = patch.numpy()
            np.multiply(crop.numpy(), _INV_255, out=x)  # uint8 channels-last -> float32 planes
            if augmentation is not None:
                augmentation.apply(patch, i)
            x -= _MEAN_NP
            x *= _INV_STD_NP
        image = None if image_uint8 is None else _normalize(image_uint8)

        sides = (boxes_xyxy_px[:, 2:] - boxes_xyxy_px[:, :2]).float()  # (M, 2) width, height
        m = self.num_patches
        target: Target = {  # normalised boxes are the same for the original and the resized image
            "boxes_cxcywh": xyxy_px_to_normalized_cxcywh(boxes_xyxy_px.float(), (height, width)),
            "labels": torch.zeros(m, dtype=torch.int64),
            "patch_index": torch.arange(m),
            "image_id": torch.tensor(file_index),
            "orig_size": torch.tensor([height, width]),
            "size": torch.tensor(new_hw),
            "area": sides.prod(dim=1),
            "iscrowd": torch.zeros(m, dtype=torch.int64),
        }
        return image, target, patches

    def fixed_size_image(self, index: int, size: int) -> tuple[int, Tensor]:
        """(file index, normalised float (3, H, W) image) of sample ``index`` resized to shortest
        side ``size`` (longest ``<= max_size``), without random draws."""
        file_index, pixels = self._load_usable(index)
        new_hw = resized_size(*pixels.shape[-2:], size, self.max_size)
        return file_index, _normalize(F.resize(pixels, list(new_hw), antialias=True))

    def _load_usable(self, index: int) -> tuple[int, Tensor]:
        """The first usable file from ``index`` on (wrapping around), decoded to uint8 (3, h, w)."""
        n = len(self)
        for step in range(n):
            file_index = (index + step) % n
            if file_index in self._bad:
                continue
            path = self.file(file_index)
            try:
                pixels = _decode_rgb(path)
            except DataError as err:
                self._skip(file_index, "unreadable", str(err))
                continue
            height, width = pixels.shape[-2:]
            if min(height, width) <= 2 * self.min_patch_size:
                self._skip(file_index, "too_small", f"{path}: {height}x{width} pixels, too small for "
                           f"{self.min_patch_size}-pixel patches (needs both sides > {2 * self.min_patch_size})")
                continue
            return file_index, pixels
        raise DataError(f"{self.root}: none of its {n} image files is usable ({dict(self.skipped)} skipped)")

    def _skip(self, file_index: int, reason: str, message: str) -> None:
        self._bad[file_index] = reason
        self.skipped[reason] += 1
        if len(self._bad) <= _MAX_WARNINGS:
            logger.warning("skipping image (%s): %s", reason, message)
            if len(self._bad) == _MAX_WARNINGS:
                logger.warning("further skipped images are counted in UnlabeledImages.skipped, not logged")


def _normalize(image_uint8: Tensor) -> Tensor:
    """uint8 (3, H, W) -> float (3, H, W) normalised with ImageNet mean/std, in cache-sized row blocks."""
    image_np = image_uint8.numpy()
    image = torch.empty(image_np.shape)
    out = image.numpy()
    rows = max(1, _CHUNK // (3 * out.shape[2]))
    for r0 in range(0, out.shape[1], rows):
        block = out[:, r0:r0 + rows]
        np.multiply(image_np[:, r0:r0 + rows], _SCALE_255_NP, out=block)
        block -= _MEAN_OVER_STD_NP
    return image


def _decode_rgb(path: str) -> Tensor:
    """uint8 (3, h, w) RGB pixels; JPEGs through libjpeg-turbo, the rest through ``load_image``.

    Both paths refuse an image over ``updetr.data.io.pixel_limit()`` before decoding it (DataError).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if decode_jpeg is not None and data[:3] == b"\xff\xd8\xff":  # JPEG: libjpeg-turbo, ~1.6x Pillow
        image_size_from_bytes(path, data)  # the pixel limit, from the header, before libjpeg allocates
        try:
            with warnings.catch_warnings():  # torchvision >= 0.29 deprecates its decoders for TorchCodec
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                   apply_exif_orientation=True)
        except (RuntimeError, TypeError):  # TypeError: torchvision < 0.17 (no EXIF argument)
            pass  # let Pillow decide, and word the error
    pixels = torch.from_numpy(np.array(load_image(path)))  # (h, w, 3)
    return pixels.permute(2, 0, 1)  # (3, h, w), channels-last in memory


def collate_pretrain(batch: Sequence[tuple[Tensor, Target, Tensor]]) -> tuple[ImageBatch, list[Target], Tensor]:
    """Batch ``UnlabeledImages`` samples: padded images, targets, patches (B, M, 3, q, q).

    Images are padded bottom/right; ``ImageBatch.padding_mask`` is ``True`` on padding.
    """
    return collate_with_patches(batch)
