"""Query patches cut from exemplar boxes (one-shot detection; docs/method.md §3).

An exemplar box must lie inside its image with both sides at least ``min_exemplar_size`` pixels
(:func:`check_exemplar_box`). Its patch is the box's crop of the original image resized to
``query_size`` x ``query_size`` (aspect ratio not kept, as in pre-training; antialiased), normalised
with ImageNet mean/std (:func:`crop_query_patch`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from updetr.data.coco import CocoStyleDataset
from updetr.data.io import DataError, load_annotated_image
from updetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["check_exemplar_box", "crop_patch_uint8", "crop_query_patch", "load_pixels", "normalize_patch"]

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def check_exemplar_box(box_xyxy_px: Sequence[float], image_hw: tuple[int, int], min_size: int, source: str) -> None:
    """Raise DataError unless the box lies inside the image and both sides are >= ``min_size`` pixels."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy_px)
    height, width = image_hw
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise DataError(f"{source}: exemplar box {list(box_xyxy_px)} is not finite")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height or x1 <= x0 or y1 <= y0:
        raise DataError(
            f"{source}: exemplar box x={x0:g}, y={y0:g}, w={x1 - x0:g}, h={y1 - y0:g} is outside the "
            f"{width}x{height} (width x height) image or empty"
        )
    if x1 - x0 < min_size or y1 - y0 < min_size:
        raise DataError(
            f"{source}: exemplar box is {x1 - x0:g}x{y1 - y0:g} pixels, smaller than the minimum "
            f"{min_size}x{min_size} (min_exemplar_size)"
        )


def crop_query_patch(pixels: Tensor, box_xyxy_px: Sequence[float], query_size: int) -> Tensor:
    """Crop a box of a uint8 (3, H, W) image, resize to (3, q, q) (antialiased), normalise (float)."""
    return normalize_patch(crop_patch_uint8(pixels, box_xyxy_px, query_size))


def crop_patch_uint8(pixels: Tensor, box_xyxy_px: Sequence[float], query_size: int) -> Tensor:
    height, width = pixels.shape[-2:]
    x0, y0 = max(0, math.floor(box_xyxy_px[0])), max(0, math.floor(box_xyxy_px[1]))
    x1, y1 = min(width, math.ceil(box_xyxy_px[2])), min(height, math.ceil(box_xyxy_px[3]))
    return F.resized_crop(pixels, y0, x0, max(1, y1 - y0), max(1, x1 - x0), [query_size, query_size], antialias=True)


def normalize_patch(patch_uint8: Tensor) -> Tensor:
    return (patch_uint8.float() / 255.0 - _MEAN) / _STD  # (3, q, q)


def load_pixels(dataset: CocoStyleDataset, index: int) -> Tensor:
    """The original image of item ``index`` as uint8 (3, H, W)."""
    hw = tuple(int(v) for v in dataset.raw_target(index)["orig_size"])
    return F.pil_to_tensor(load_annotated_image(dataset.image_paths[index], hw))
