"""Model output -> per-image detections in pixels of the original image (DETR's PostProcess)."""

from __future__ import annotations

import torch
from torch import Tensor

from updetr.box_ops import normalized_cxcywh_to_xyxy_px
from updetr.structures import DetectionOutput

__all__ = ["postprocess_detections"]


@torch.no_grad()
def postprocess_detections(
    output: DetectionOutput,
    orig_sizes: Tensor,
    *,
    score_threshold: float | None = None,
    top_k: int | None = None,
) -> list[dict[str, Tensor]]:
    """Scores, labels and pixel boxes of every query, one dict per image.

    The score of a query is its best class probability after a softmax over the C + 1
    logits, the no-object column excluded; its label is that class.

    Args:
        output: the model output; only ``logits`` (B, Q, C + 1) and ``boxes_cxcywh`` (B, Q, 4)
            of the last layer are used.
        orig_sizes: (B, 2) (height, width) in pixels the boxes are scaled to, normally
            ``target["orig_size"]`` (the image as stored on disk).
        score_threshold: drop detections with a lower score.
        top_k: keep at most this many detections per image, highest score first.

    Returns:
        B dicts with ``scores`` float (K,), ``labels`` int64 (K,) contiguous class index
        in [0, C) and ``boxes_xyxy`` float (K, 4), xyxy pixels of the original image (not
        clipped). Without ``score_threshold`` and ``top_k``, K = Q in query order;
        with ``top_k`` the detections are sorted by decreasing score.
    """
    logits, boxes_cxcywh = output.logits, output.boxes_cxcywh
    if orig_sizes.shape != (logits.shape[0], 2):
        raise ValueError(f"orig_sizes must be (B, 2) = ({logits.shape[0]}, 2), got {tuple(orig_sizes.shape)}")
    prob = logits.float().softmax(-1)[..., :-1]  # (B, Q, C)
    scores, labels = prob.max(-1)  # (B, Q) each
    boxes_xyxy_px = normalized_cxcywh_to_xyxy_px(boxes_cxcywh.float(), orig_sizes.to(boxes_cxcywh.device))  # (B, Q, 4)

    results = []
    for image_scores, image_labels, image_boxes in zip(scores, labels, boxes_xyxy_px):
        if score_threshold is not None:
            keep = image_scores >= score_threshold
            image_scores, image_labels, image_boxes = image_scores[keep], image_labels[keep], image_boxes[keep]
        if top_k is not None:
            order = image_scores.argsort(descending=True)[:top_k]
            image_scores, image_labels, image_boxes = image_scores[order], image_labels[order], image_boxes[order]
        results.append({"scores": image_scores, "labels": image_labels, "boxes_xyxy": image_boxes})
    return results
