"""Box helpers. Thin wrappers over ``torchvision.ops``; formats are in the names."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou

__all__ = [
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "normalized_cxcywh_to_xyxy_px",
    "xyxy_px_to_normalized_cxcywh",
]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def normalized_cxcywh_to_xyxy_px(boxes_cxcywh: Tensor, sizes_hw: Tensor) -> Tensor:
    """(…, 4) normalised cxcywh -> pixels xyxy; ``sizes_hw`` is (…, 2) (height, width)."""
    xyxy = cxcywh_to_xyxy(boxes_cxcywh)
    h, w = sizes_hw[..., 0:1].to(xyxy.dtype), sizes_hw[..., 1:2].to(xyxy.dtype)
    scale = torch.cat([w, h, w, h], dim=-1)
    return xyxy * scale.unsqueeze(-2) if scale.dim() < xyxy.dim() else xyxy * scale


def xyxy_px_to_normalized_cxcywh(boxes_xyxy_px: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """(N, 4) pixel xyxy of an image of ``size_hw`` -> normalised cxcywh."""
    h, w = size_hw
    scale = boxes_xyxy_px.new_tensor([w, h, w, h])
    return xyxy_to_cxcywh(boxes_xyxy_px / scale)
