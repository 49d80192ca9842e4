"""Unlabelled images and their random query patches for UP-DETR pre-training (docs/method.md §1 "Data").

Every sample is one image of a folder tree (labels are never used; the files are listed by
``updetr.data.image_list``) with M random query patches cut from it: the boxes and the
augmentation are ``updetr.data.query_patches``. Each patch is the crop of its box from the
original image, resized to ``query_size`` x ``query_size`` (aspect ratio not kept), then
augmented, then ImageNet-normalised. The image itself is resized (shortest side drawn from
``scales``, longest <= ``max_size``, no flip) and normalised.

Speed (``benchmarks/pretrain_data.py`` compares with the paper's PIL pipeline): the image is
decoded once to ``uint8`` (libjpeg-turbo for JPEG), each crop is resized with torch's
antialiased ``uint8`` kernel (the same filter as PIL's bilinear resize), and each patch then
runs through its whole augmentation chain while it is in cache. The image is converted and
normalised in row blocks that stay in cache between the two passes.

Randomness: every draw of a sample comes from one ``numpy.random.Generator`` seeded by
``(seed, epoch, index)``, never from global state. DataLoader workers therefore never repeat
each other's crops (the paper's code used ``np.random`` in workers, docs/method.md §7.7), a sample
is reproducible, and resuming at any (epoch, index) gives the same data.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from updetr.box_ops import xyxy_px_to_normalized_cxcywh
from updetr.data.collate import collate_with_patches
from updetr.data.image_list import scan_relative
from updetr.data.io import DataError, image_size_from_bytes, load_image
from updetr.data.query_patches import PatchAugmentation, sample_patch_boxes
from updetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resized_size
from updetr.structures import ImageBatch, Target

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without its (deprecated) image decoders: Pillow decodes everything
    decode_jpeg = None

if TYPE_CHECKING:
    from updetr.config import Config

__all__ = ["UnlabeledImages", "collate_pretrain"]

logger = logging.getLogger(__name__)

_MAX_WARNINGS = 10  # skipped files logged one by one per process; later ones are only counted


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
        max_patch_size: int = 0,
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
        self.max_patch_size = max_patch_size
        self.scales = tuple(int(s) for s in scales)
        self.max_size = max_size
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        # Relative paths in one fixed-width bytes array, not a list of 1.28M Python strings:
        # reading it in DataLoader workers does not touch (and so copy) per-object refcounts.
        self._relative = np.array([os.fsencode(p) for p in scan_relative(self.root, cache_dir, False)])
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
            max_patch_size=cfg.pretrain.max_patch_size,
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
        boxes_xyxy_px = sample_patch_boxes(height, width, self.num_patches, self.min_patch_size, rng,
                                           self.max_patch_size)  # (M, 4)
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
