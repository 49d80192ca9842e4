"""Typed containers passed between data, model, loss and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TypedDict

import torch
from torch import Tensor

# The ImageNet channel mean and std (RGB, pixels in [0, 1]) that every ImageBatch's pixels are normalised with:
# the transforms apply them, and a CNN whose weights expect another normalisation converts inside its forward.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pad_bottom_right(maps: list[Tensor], size_divisibility: int = 1) -> tuple[Tensor, Tensor]:
    """(C, H_i, W_i) tensors -> zero-padded (B, C, H, W) and the mask (B, H, W), True on padding.

    H and W are the largest sizes, rounded up to a multiple of ``size_divisibility``.
    """
    multiple = max(1, size_divisibility)
    max_h = -(-max(m.shape[-2] for m in maps) // multiple) * multiple
    max_w = -(-max(m.shape[-1] for m in maps) // multiple) * multiple
    out = maps[0].new_zeros((len(maps), maps[0].shape[0], max_h, max_w))
    mask = torch.ones((len(maps), max_h, max_w), dtype=torch.bool)
    for i, m in enumerate(maps):
        h, w = m.shape[-2:]
        out[i, :, :h, :w] = m
        mask[i, :h, :w] = False
    return out, mask


@dataclass
class ImageBatch:
    """A batch of images padded to a common size.

    Attributes:
        pixels: float tensor (B, 3, H, W), normalised with ``IMAGENET_MEAN`` / ``IMAGENET_STD``; padded
            pixels are 0.
        padding_mask: bool tensor (B, H, W); ``True`` marks padding (not image).
    """

    pixels: Tensor
    padding_mask: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ImageBatch":
        return ImageBatch(
            self.pixels.to(device, non_blocking=non_blocking),
            self.padding_mask.to(device, non_blocking=non_blocking),
        )

    @property
    def image_sizes(self) -> Tensor:
        """Unpadded (height, width) of each image, long tensor (B, 2)."""
        valid = ~self.padding_mask
        heights = valid.any(dim=2).sum(dim=1)  # (B,)
        widths = valid.any(dim=1).sum(dim=1)  # (B,)
        return torch.stack([heights, widths], dim=1)

    @classmethod
    def from_tensors(cls, images: list[Tensor], size_divisibility: int = 1) -> "ImageBatch":
        """Pad a list of (3, H_i, W_i) tensors to a batch, bottom/right padding."""
        if not images:
            raise ValueError("ImageBatch.from_tensors needs at least one image")
        return cls(*_pad_bottom_right(images, size_divisibility))


@dataclass
class FeatureBatch:
    """A batch of precomputed last-layer CNN features, padded to a common size.

    What a frozen backbone would return for an :class:`ImageBatch`; used when the
    features were computed once and cached (``data.cache_features``).

    Attributes:
        features: float tensor (B, Cb, h, w); padded cells are 0.
        padding_mask: bool tensor (B, h, w); ``True`` marks padding (not image).
    """

    features: Tensor
    padding_mask: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "FeatureBatch":
        return FeatureBatch(
            self.features.to(device, non_blocking=non_blocking),
            self.padding_mask.to(device, non_blocking=non_blocking),
        )

    @classmethod
    def from_tensors(cls, features: list[Tensor]) -> "FeatureBatch":
        """Pad a list of (Cb, h_i, w_i) feature maps to a batch, bottom/right padding."""
        if not features:
            raise ValueError("FeatureBatch.from_tensors needs at least one feature map")
        return cls(*_pad_bottom_right(features))


class Target(TypedDict, total=False):
    """Annotations of one image, as every dataset of this package yields them.

    Boxes (exactly one of the two keys is present when the image has boxes):

    - ``boxes_xyxy``: float (N, 4), xyxy **pixels of the original image**; the raw dataset output, before the
      training/eval transforms (``updetr.data.transforms``).
    - ``boxes_cxcywh``: float (N, 4), **normalised cxcywh** relative to ``size``; what the transforms turn
      ``boxes_xyxy`` into, and what the matcher and the losses read.

    Per instance and per image:

    - ``labels``: int64 (N,), contiguous class index in ``[0, C)``.
    - ``image_id``: int64 scalar tensor; the id in the source annotation file.
    - ``orig_size``: int64 (2,), (height, width) of the image as stored on disk.
    - ``size``: int64 (2,), (height, width) after resizing/cropping, before padding.
    - ``area``: float (N,), box or mask area in pixels of the original image.
    - ``iscrowd``: int64 (N,), 1 for crowd regions (ignored by the loss).
    - ``masks``: bool (N, H, W), instance masks at ``size`` (panoptic/segmentation only).

    Task-specific keys:

    - ``patch_index``: int64 (N,), pre-training: target ``n`` is the box of query patch ``patch_index[n]`` (its
      query group); the matcher and the feature-reconstruction loss read it.
    - ``query_label``: int64 scalar, one-shot: the class index of the episode's query patch (its targets are
      that class's boxes, labelled 0, "matches the query").
    - ``query_image_id``: int64 scalar, one-shot training: the image the query patch was cut from.
    - ``episode``: int64 scalar, one-shot evaluation: the index of the (image, class) episode.
    """

    boxes_xyxy: Tensor
    boxes_cxcywh: Tensor
    labels: Tensor
    image_id: Tensor
    orig_size: Tensor
    size: Tensor
    area: Tensor
    iscrowd: Tensor
    masks: Tensor
    patch_index: Tensor
    query_label: Tensor
    query_image_id: Tensor
    episode: Tensor


@dataclass
class DetectionOutput:
    """What every detector of this package returns, in train and eval mode alike.

    Attributes:
        logits: (B, Q, C + 1) class logits; the last index is "no object".
        boxes_cxcywh: (B, Q, 4) cxcywh **normalised** to the unpadded image, in [0, 1] (sigmoid output).
        aux: outputs of the decoder layers before the last (L - 1 entries, first layer
            first), each a ``DetectionOutput`` with ``aux == []``; empty when auxiliary
            losses are off.
        features: (B, Q, Cb) reconstructed query-patch CNN features (UP-DETR
            pre-training with feature reconstruction), else ``None``.
        patch_features: (B, M, Cb) pooled CNN features of the query patches (the
            reconstruction target), else ``None``.
        masks: (B, Q, H/4, W/4) mask logits (segmentation), else ``None``.
    """

    logits: Tensor
    boxes_cxcywh: Tensor
    aux: list["DetectionOutput"] = field(default_factory=list)
    features: Tensor | None = None
    patch_features: Tensor | None = None
    masks: Tensor | None = None

    def layers(self) -> list["DetectionOutput"]:
        """Every supervised decoder layer, last layer first, each sharing ``patch_features``."""
        out = [self]
        out.extend(replace(a, patch_features=self.patch_features) for a in self.aux)
        return out

    def detach(self) -> "DetectionOutput":
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.detach()
            elif f.name == "aux":
                value = [a.detach() for a in value]
            kwargs[f.name] = value
        return DetectionOutput(**kwargs)
