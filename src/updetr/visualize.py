"""Drawing detections on images (torchvision.utils.draw_bounding_boxes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

_PALETTE = [
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
    "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
]


def draw_detections(
    image: Image.Image,
    boxes_xyxy_px: torch.Tensor,
    labels: list[str],
    scores: torch.Tensor | None = None,
    color_ids: list[int] | None = None,
    width: int = 2,
) -> Image.Image:
    """Return a copy of ``image`` with boxes (N, 4) xyxy pixels and "label score" captions."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    if len(boxes_xyxy_px) == 0:
        return image.convert("RGB")
    captions = [f"{lab} {float(s):.2f}" if scores is not None else lab for lab, s in zip(labels, scores if scores is not None else labels)]
    ids = color_ids if color_ids is not None else list(range(len(labels)))
    colors = [_PALETTE[i % len(_PALETTE)] for i in ids]
    drawn = draw_bounding_boxes(pixels, boxes_xyxy_px.float(), labels=captions, colors=colors, width=width)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def save_image(image: Image.Image, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    image.save(tmp)
    tmp.replace(path)
