"""DETR's detection augmentation on ``torchvision.transforms.v2``.

The image, its boxes and its instance masks are wrapped as ``tv_tensors`` (``Image``,
``BoundingBoxes``, ``Mask``) and every geometric step is one ``v2.functional`` call applied
to all of them, so they cannot drift apart.

Train (as DETR, ``datasets/coco.py``):

1. horizontal flip with probability ``cfg.hflip``;
2. with probability 0.5 (only when ``cfg.crop``), else always:

   a. resize the shortest side to a size drawn from ``cfg.scales``, longest side
      ``<= cfg.max_size``;

   b. resize the shortest side to a size drawn from ``cfg.crop_resize``, crop a random
      window whose sides are drawn from ``[crop_size[0], crop_size[1]]`` (clamped to the
      image), then as (a). Boxes are clipped to the crop; boxes left with zero area are
      removed together with their ``labels``, ``area``, ``iscrowd`` and ``masks``.

Eval: resize the shortest side to ``cfg.val_size``, longest side ``<= cfg.max_size``.

Resizing runs on ``uint8`` pixels (antialiased); only the final image is converted to
float and normalised with ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from updetr.config import DataConfig
from updetr.structures import IMAGENET_MEAN, IMAGENET_STD, Target

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DetectionTransform", "build_transforms", "resized_size"]

# Per-instance target entries (first dimension N) filtered together with the boxes.
_INSTANCE_KEYS = ("labels", "area", "iscrowd")


def resized_size(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(height, width) after scaling the shortest side to ``size``, longest ``<= max_size``.

    The aspect ratio is kept; when the longest side would exceed ``max_size`` the image is
    scaled so that the longest side equals ``max_size`` instead (DETR's rule).
    """
    scale = size / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class _Sample:
    """An image with its boxes and masks, transformed together."""

    image: tv_tensors.Image  # (3, H, W) uint8
    boxes_xyxy: tv_tensors.BoundingBoxes | None  # (N, 4) xyxy pixels
    masks: tv_tensors.Mask | None  # (N, H, W) bool

    def apply(self, op: Any, **kwargs: Any) -> "_Sample":
        return _Sample(
            op(self.image, **kwargs),
            None if self.boxes_xyxy is None else op(self.boxes_xyxy, **kwargs),
            None if self.masks is None else op(self.masks, **kwargs),
        )

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])


class DetectionTransform:
    """Callable ``(image, target) -> (pixels, target)`` implementing DETR's augmentation.

    Input: a ``PIL.Image.Image`` (or a ``(3, H, W)`` uint8 tensor) and a :class:`Target`
    with ``boxes_xyxy`` (optional; pixels of that image); ``masks`` (optional) are
    bool ``(N, H, W)``. The target may hold only metadata (e.g. ``image_id``).

    Output: float ``(3, H', W')`` pixels normalised with ImageNet mean/std, and a new
    target (the input is not modified) with ``boxes_cxcywh`` (normalised to ``size``) in
    place of ``boxes_xyxy``, ``size = (H', W')`` int64, masks resized/cropped with the image, and
    ``orig_size``/``area``/other entries passed through (``area`` stays in original pixels).

    Randomness comes from ``generator`` or, when it is ``None``, torch's global RNG — which
    ``DataLoader`` seeds differently in every worker; do not share one generator across
    workers.
    """

    def __init__(
        self,
        *,
        train: bool,
        scales: Sequence[int],
        max_size: int | None,
        val_size: int = 800,
        hflip: float = 0.5,
        crop: bool = True,
        crop_resize: Sequence[int] = (400, 500, 600),
        crop_size: Sequence[int] = (384, 600),
        generator: torch.Generator | None = None,
    ) -> None:
        if train and not scales:
            raise ValueError("DetectionTransform: scales must not be empty")
        if crop and train and (not crop_resize or len(crop_size) != 2 or not 0 < crop_size[0] <= crop_size[1]):
            raise ValueError(f"DetectionTransform: bad crop_resize={crop_resize} / crop_size={crop_size}")
        self.train = train
        self.scales = [int(s) for s in scales]
        self.max_size = max_size
        self.val_size = int(val_size)
        self.hflip = float(hflip)
        self.crop = bool(crop)
        self.crop_resize = [int(s) for s in crop_resize]
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.generator = generator

    def __repr__(self) -> str:
        if not self.train:
            return f"DetectionTransform(eval, val_size={self.val_size}, max_size={self.max_size})"
        crop = f", crop_resize={self.crop_resize}, crop_size={list(self.crop_size)}" if self.crop else ""
        return f"DetectionTransform(train, scales={self.scales}, max_size={self.max_size}, hflip={self.hflip}{crop})"

    # -- randomness ---------------------------------------------------------------------
    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _randint(self, low: int, high: int) -> int:
        """Uniform integer in ``[low, high]`` (inclusive)."""
        return int(torch.randint(low, high + 1, (), generator=self.generator))

    def _choice(self, values: Sequence[int]) -> int:
        return values[self._randint(0, len(values) - 1)]

    # -- steps --------------------------------------------------------------------------
    def _resize(self, sample: _Sample, size: int, max_size: int | None) -> _Sample:
        new_hw = resized_size(*sample.hw, size, max_size)
        if new_hw == sample.hw:
            return sample
        return sample.apply(F.resize, size=list(new_hw), antialias=True)

    def _random_crop(self, sample: _Sample) -> tuple[_Sample, Tensor | None]:
        """Random window, boxes clipped by torchvision; returns the kept-instance mask (N,)."""
        height, width = sample.hw
        low, high = self.crop_size
        crop_h = self._randint(min(low, height), min(high, height))
        crop_w = self._randint(min(low, width), min(high, width))
        top = self._randint(0, height - crop_h)
        left = self._randint(0, width - crop_w)
        sample = sample.apply(F.crop, top=top, left=left, height=crop_h, width=crop_w)
        if sample.boxes_xyxy is None:
            return sample, None
        boxes = sample.boxes_xyxy  # (N, 4) xyxy, clamped to the crop
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # (N,) non-zero area
        if bool(keep.all()):
            return sample, None
        return _Sample(
            sample.image,
            tv_tensors.wrap(boxes[keep], like=boxes),
            None if sample.masks is None else tv_tensors.wrap(sample.masks[keep], like=sample.masks),
        ), keep

    def _augment(self, sample: _Sample) -> tuple[_Sample, Tensor | None]:
        keep = None
        if self.hflip > 0 and self._rand() < self.hflip:
            sample = sample.apply(F.horizontal_flip)
        if self.crop and self._rand() < 0.5:
            sample = self._resize(sample, self._choice(self.crop_resize), None)
            sample, keep = self._random_crop(sample)
        sample = self._resize(sample, self._choice(self.scales), self.max_size)
        return sample, keep

    # -- entry point ----------------------------------------------------------------------
    def __call__(self, image: Image.Image | Tensor, target: Target | dict | None = None) -> tuple[Tensor, Target]:
        target = dict(target) if target else {}
        if isinstance(image, Image.Image):
            image = image if image.mode == "RGB" else image.convert("RGB")
            pixels = F.pil_to_tensor(image)  # (3, H, W) uint8
        else:
            pixels = image
        if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[0] != 3:
            raise ValueError(
                f"DetectionTransform expects RGB uint8 (3, H, W) pixels, got {tuple(pixels.shape)} {pixels.dtype}"
            )
        canvas = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        boxes = masks = None
        if "boxes_xyxy" in target:
            boxes = tv_tensors.BoundingBoxes(
                torch.as_tensor(target.pop("boxes_xyxy"), dtype=torch.float32).reshape(-1, 4), format="XYXY",
                canvas_size=canvas,
            )
            boxes = F.clamp_bounding_boxes(boxes)  # (N, 4) xyxy pixels inside the image
        if "masks" in target:
            masks = tv_tensors.Mask(torch.as_tensor(target["masks"]).to(torch.bool))  # (N, H, W)
        sample = _Sample(tv_tensors.Image(pixels), boxes, masks)

        if self.train:
            sample, keep = self._augment(sample)
            if keep is not None:
                for key in _INSTANCE_KEYS:
                    if key in target:
                        target[key] = target[key][keep]
        else:
            sample = self._resize(sample, self.val_size, self.max_size)

        height, width = sample.hw
        pixels = F.to_dtype(sample.image, torch.float32, scale=True)
        pixels = F.normalize(pixels, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        target["size"] = torch.tensor([height, width], dtype=torch.int64)
        if sample.boxes_xyxy is not None:
            boxes_cxcywh_px = F.convert_bounding_box_format(sample.boxes_xyxy, new_format="CXCYWH")
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            target["boxes_cxcywh"] = boxes_cxcywh_px.as_subclass(Tensor) / scale  # (N, 4) normalised
        if sample.masks is not None:
            target["masks"] = sample.masks.as_subclass(Tensor)  # (N, H', W') bool
        return pixels.as_subclass(Tensor), target  # type: ignore[return-value]


def build_transforms(cfg: DataConfig, train: bool, *, generator: torch.Generator | None = None) -> DetectionTransform:
    """DETR's train or eval transform from a :class:`~updetr.config.DataConfig`.

    Uses ``scales``, ``max_size``, ``hflip``, ``crop``, ``crop_resize``, ``crop_size``
    (train) and ``val_size``, ``max_size`` (eval). See :class:`DetectionTransform` for the
    input/output contract.
    """
    return DetectionTransform(
        train=train,
        scales=cfg.scales,
        max_size=cfg.max_size,
        val_size=cfg.val_size,
        hflip=cfg.hflip,
        crop=cfg.crop,
        crop_resize=cfg.crop_resize,
        crop_size=cfg.crop_size,
        generator=generator,
    )
