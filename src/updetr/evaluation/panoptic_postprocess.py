"""Panoptic post-processing: the model's class and mask logits as COCO panoptic segments, and as instances
for segmentation AP (scored by ``updetr.evaluation.panoptic``).

Post-processing (DETR's ``PostProcessPanoptic``, with its id-0 and padding quirks fixed):
queries whose most likely class is not "no object" and whose probability exceeds
``threshold`` (0.85) are kept; every pixel goes to the kept query with the highest mask
logit; the kept queries of one stuff class form one segment; segments smaller than
``min_area`` pixels are dropped and the pixels re-assigned, until none is. The result is
COCO panoptic: an id map (0 = void, only when nothing is kept) plus ``segments_info``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from updetr.structures import DetectionOutput

__all__ = ["PanopticSegmentation", "instance_predictions", "postprocess_panoptic", "upsample_masks"]


@dataclass
class PanopticSegmentation:
    """One image's panoptic prediction in COCO panoptic form.

    Attributes:
        segment_ids: (H, W) int64 at the original image size; 0 = void; ids 1..S.
        segments_info: S dicts: ``id``, ``category_id`` (dataset id), ``label`` (contiguous
            class), ``isthing``, ``iscrowd`` (0), ``score`` (highest class probability of
            its queries), ``area`` (pixels), ``bbox`` [x, y, w, h] pixels.
    """

    segment_ids: Tensor
    segments_info: list[dict[str, Any]] = field(default_factory=list)


def upsample_masks(masks: Tensor, image_size: tuple[int, int], padded_size: tuple[int, int]) -> Tensor:
    """Mask logits (K, h, w) of the padded batch -> (K, H, W) logits of the image.

    Bilinear to ``padded_size`` (the batch's pixel grid), then the image's top-left
    ``image_size`` (its size after the transforms, before padding) is cut out.
    """
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *image_size))
    up = F.interpolate(masks[:, None].float(), size=padded_size, mode="bilinear", align_corners=False)[:, 0]
    return up[:, : image_size[0], : image_size[1]]  # (K, H, W)


def _resize_ids(ids: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(ids.shape) == tuple(size):
        return ids
    return F.interpolate(ids[None, None].float(), size=size, mode="nearest")[0, 0].long()


@torch.no_grad()
def postprocess_panoptic(
    output: DetectionOutput,
    image_sizes: Tensor,
    orig_sizes: Tensor,
    *,
    isthing: list[bool],
    category_ids: list[int],
    threshold: float = 0.85,
    min_area: int = 5,
    padded_size: tuple[int, int] | None = None,
) -> list[PanopticSegmentation]:
    """Panoptic segmentation of every image of a batch.

    Args:
        output: model output with ``logits`` (B, Q, C + 1) and ``masks`` (B, Q, h, w) logits.
        image_sizes: (B, 2) (height, width) of each image after the transforms, before
            padding (``target["size"]``).
        orig_sizes: (B, 2) (height, width) on disk; the id maps have this size.
        isthing, category_ids: per contiguous label.
        threshold: keep queries whose best class is not no-object with probability > this.
        min_area: segments with fewer pixels (at the original size) are dropped (DETR: 5).
        padded_size: the batch's (H, W) pixel grid; default the largest of ``image_sizes``
            (bottom/right padding without size divisibility, as ``collate_detection``).
    """
    if output.masks is None:
        raise ValueError("postprocess_panoptic needs an output with masks")
    if min_area < 1:
        raise ValueError(f"min_area={min_area} must be >= 1")
    if padded_size is None:
        padded_size = (int(image_sizes[:, 0].max()), int(image_sizes[:, 1].max()))
    probs = output.logits.float().softmax(-1)  # (B, Q, C+1)
    no_object = probs.shape[-1] - 1
    results = []
    for prob, masks, size, orig in zip(probs, output.masks, image_sizes.tolist(), orig_sizes.tolist()):
        scores, labels = prob.max(-1)  # (Q,)
        keep = (labels != no_object) & (scores > threshold)
        scores, labels = scores[keep], labels[keep]
        logits = upsample_masks(masks[keep], tuple(size), padded_size).flatten(1)  # (K, H*W)
        results.append(_segments(logits, scores, labels, tuple(size), tuple(orig), isthing, category_ids, min_area))
    return results


def _segments(
    logits: Tensor, scores: Tensor, labels: Tensor, size: tuple[int, int], orig: tuple[int, int],
    isthing: list[bool], category_ids: list[int], min_area: int,
) -> PanopticSegmentation:
    """Assign pixels, merge stuff, drop small segments; ``logits`` (K, H*W) at ``size``."""
    alive = torch.ones(len(scores), dtype=torch.bool)  # (K,) queries still in play
    while True:
        index = alive.nonzero().flatten().tolist()
        if not index:
            return PanopticSegmentation(torch.zeros(orig, dtype=torch.int64), [])
        owner, first_of_stuff = {}, {}  # query -> the query whose segment it joins
        for q in index:
            label = int(labels[q])
            owner[q] = q if isthing[label] else first_of_stuff.setdefault(label, q)
        best = logits[index].argmax(0).cpu()  # (H*W,) position in ``index`` of the highest mask logit
        query_map = torch.tensor([owner[q] for q in index])[best].view(size)  # (H, W) owning query
        query_map = _resize_ids(query_map, orig)  # (H0, W0)
        areas = torch.bincount(query_map.flatten(), minlength=len(scores))  # (K,)
        small = {q for q in set(owner.values()) if int(areas[q]) < min_area}
        if not small:
            break
        for q in index:
            if owner[q] in small:
                alive[q] = False
    segment_ids = torch.zeros(orig, dtype=torch.int64)
    segments = []
    for q in sorted(set(owner.values())):
        pixels = query_map == q
        area = int(areas[q])
        members = [m for m in index if owner[m] == q]
        label = int(labels[q])
        segment_id = len(segments) + 1
        segment_ids[pixels] = segment_id
        ys, xs = pixels.any(1).nonzero().flatten(), pixels.any(0).nonzero().flatten()
        segments.append({
            "id": segment_id, "category_id": int(category_ids[label]), "label": label, "isthing": bool(isthing[label]),
            "iscrowd": 0, "score": round(float(scores[members].max()), 6), "area": area,
            "bbox": [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)],
        })
    return PanopticSegmentation(segment_ids, segments)


@torch.no_grad()
def instance_predictions(
    output: DetectionOutput, image_sizes: Tensor, orig_sizes: Tensor, *, padded_size: tuple[int, int] | None = None
) -> list[dict[str, Tensor]]:
    """Every query as an instance: ``scores`` (Q,), ``labels`` (Q,) (best class, no-object
    excluded) and ``masks`` bool (Q, H0, W0) = sigmoid > 0.5 at the original size (DETR's
    ``PostProcessSegm``)."""
    if output.masks is None:
        raise ValueError("instance_predictions needs an output with masks")
    if padded_size is None:
        padded_size = (int(image_sizes[:, 0].max()), int(image_sizes[:, 1].max()))
    scores, labels = output.logits.float().softmax(-1)[..., :-1].max(-1)  # (B, Q)
    out = []
    for s, lab, masks, size, orig in zip(scores, labels, output.masks, image_sizes.tolist(), orig_sizes.tolist()):
        logits = upsample_masks(masks, tuple(size), padded_size)  # (Q, H, W)
        logits = F.interpolate(logits[:, None], size=tuple(orig), mode="bilinear", align_corners=False)[:, 0]
        out.append({"scores": s, "labels": lab, "masks": logits > 0})
    return out
