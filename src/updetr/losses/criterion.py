"""DETR set criterion with UP-DETR's feature reconstruction term (docs/method.md §1).

For every supervised decoder layer the queries are matched to the targets
(:class:`~updetr.losses.matcher.HungarianMatcher`), then:

- ``loss_ce``: weighted cross-entropy over all Q queries; unmatched queries target the
  no-object index C, whose weight is ``eos_coef``.
- ``loss_bbox``: L1 between matched normalised cxcywh boxes, summed / ``num_boxes``.
- ``loss_giou``: ``1 - GIoU`` of matched boxes, summed / ``num_boxes``.
- ``loss_feature`` (UP-DETR Eq. 2, only when the output carries ``features`` and
  ``patch_features``): ``|p / |p| - g / |g||^2`` between a matched query's
  reconstructed feature ``p`` and its query patch's CNN feature ``g``, summed /
  ``num_boxes``.

``num_boxes`` is the mean number of non-crowd targets per process (all-reduced when
``torch.distributed`` is initialised), so the losses mean the same under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.box_ops import cxcywh_to_xyxy, generalized_box_iou
from updetr.config import LossConfig
from updetr.losses.matcher import HungarianMatcher, matchable_targets
from updetr.structures import DetectionOutput, Target

__all__ = [
    "SetCriterion",
    "build_criterion",
    "boxes_loss",
    "feature_reconstruction_loss",
    "labels_loss",
    "num_boxes_for_loss",
]

Indices = list[tuple[Tensor, Tensor]]


def num_boxes_for_loss(targets: list[Target], device: torch.device) -> float:
    """Non-crowd targets in the batch, averaged over processes, at least 1."""
    count = sum(int(matchable_targets(t).numel()) for t in targets)
    num_boxes = torch.tensor([float(count)], device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        world_size = dist.get_world_size()
    return max(num_boxes.item() / world_size, 1.0)


def _process_mean(value: Tensor) -> Tensor:
    """Mean of a scalar over processes (the value itself without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def _flat_indices(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Image and query index of every matched pair (each (P,), on ``device``), and the
    per-image target indices."""
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
    query_idx = torch.cat([q for q, _ in indices]).to(device)
    target_idx = [t for _, t in indices]
    return batch_idx, query_idx, target_idx


def labels_loss(
    logits: Tensor, targets: list[Target], indices: Indices, empty_weight: Tensor
) -> tuple[Tensor, Tensor]:
    """Weighted CE over all queries and the class error (%) of the matched ones.

    Returns ``(loss_ce, class_error)``; ``class_error`` is detached and 0 without matches.
    """
    batch_size, num_queries, num_logits = logits.shape
    batch_idx, query_idx, _ = _flat_indices(indices, logits.device)
    matched_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
    matched_labels = matched_labels.to(logits.device, torch.int64)
    target_classes = torch.full((batch_size, num_queries), num_logits - 1, dtype=torch.int64, device=logits.device)
    target_classes[batch_idx, query_idx] = matched_labels
    # cross_entropy wants classes on dim 1: (B, C+1, Q). The weighted mean's denominator
    # (total class weight) is averaged over processes like num_boxes, so that DDP on B
    # images per process gives exactly the gradient of one process on the global batch.
    loss_sum = F.cross_entropy(logits.transpose(1, 2).float(), target_classes, weight=empty_weight, reduction="sum")
    loss_ce = loss_sum / _process_mean(empty_weight[target_classes].sum().detach())
    if matched_labels.numel() == 0:
        class_error = logits.new_zeros(())
    else:
        correct = logits[batch_idx, query_idx].detach().argmax(-1) == matched_labels
        class_error = 100.0 - 100.0 * correct.float().mean()
    return loss_ce, class_error


def boxes_loss(
    boxes_cxcywh: Tensor, targets: list[Target], indices: Indices, num_boxes: float
) -> tuple[Tensor, Tensor]:
    """``(loss_bbox, loss_giou)`` of the matched boxes, each summed / ``num_boxes``."""
    batch_idx, query_idx, target_idx = _flat_indices(indices, boxes_cxcywh.device)
    pred = boxes_cxcywh[batch_idx, query_idx].float()  # (P, 4)
    gt = torch.cat([t["boxes_cxcywh"][j.to(t["boxes_cxcywh"].device)] for t, j in zip(targets, target_idx)])
    gt = gt.to(pred.device, pred.dtype)  # (P, 4)
    loss_bbox = F.l1_loss(pred, gt, reduction="sum") / num_boxes
    giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt)))  # (P,)
    loss_giou = (1 - giou).sum() / num_boxes
    return loss_bbox, loss_giou


def feature_reconstruction_loss(
    features: Tensor, patch_features: Tensor, targets: list[Target], indices: Indices, num_boxes: float
) -> Tensor:
    """UP-DETR Eq. 2 between matched queries' features (B, Q, Cb) and their patches' (B, M, Cb).

    Target ``n`` of image ``b`` is query patch ``targets[b]["patch_index"][n]`` when that
    key is present, else patch ``n``.
    """
    batch_idx, query_idx, target_idx = _flat_indices(indices, features.device)
    patch_idx = []
    for t, j in zip(targets, target_idx):
        patch_index = t.get("patch_index")
        patch_idx.append(patch_index[j.to(patch_index.device)].to(features.device) if patch_index is not None else j)
    patch_idx = torch.cat(patch_idx).to(features.device, torch.int64)
    pred = F.normalize(features[batch_idx, query_idx].float(), dim=-1)  # (P, Cb)
    gt = F.normalize(patch_features[batch_idx, patch_idx].float(), dim=-1)  # (P, Cb)
    return (pred - gt).pow(2).sum() / num_boxes


class SetCriterion(nn.Module):
    """Matches every decoder layer and adds up the named, weighted loss terms.

    Args:
        num_classes: C, classes without no-object; logits have C + 1 entries.
        matcher: the query-target assignment.
        loss_ce, loss_bbox, loss_giou, loss_feature: weights of the terms in ``loss``.
        eos_coef: cross-entropy weight of the no-object class (UP-DETR: M / Q).
        group_size: forwarded to the matcher (UP-DETR group matching), None = global.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        *,
        loss_ce: float = 1.0,
        loss_bbox: float = 5.0,
        loss_giou: float = 2.0,
        loss_feature: float = 1.0,
        eos_coef: float = 0.1,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes={num_classes} must be positive")
        if not 0 < eos_coef <= 1:
            raise ValueError(f"eos_coef={eos_coef} must be in (0, 1]")
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.group_size = group_size
        self.weight_dict = {
            "loss_ce": loss_ce,
            "loss_bbox": loss_bbox,
            "loss_giou": loss_giou,
            "loss_feature": loss_feature,
        }
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, "
            f"group_size={self.group_size}, weights={self.weight_dict}"
        )

    def forward(self, output: DetectionOutput, targets: list[Target]) -> dict[str, Tensor]:
        """Loss terms of every layer plus ``loss`` (weighted total) and ``class_error``.

        Keys: ``loss_ce``, ``loss_bbox``, ``loss_giou`` (and ``loss_feature`` when the
        output has features) for the last layer, the same with suffix ``_0``, ``_1``, …
        for ``output.aux`` in order, then ``loss`` and ``class_error`` (last layer, %,
        detached).
        """
        if output.logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"logits have {output.logits.shape[-1]} classes, expected num_classes + 1 = {self.num_classes + 1}"
            )
        num_boxes = num_boxes_for_loss(targets, output.logits.device)
        losses: dict[str, Tensor] = {}
        total = output.logits.new_zeros((), dtype=torch.float32)
        class_error = None
        for layer_index, layer in enumerate(output.layers()):
            suffix = "" if layer_index == 0 else f"_{layer_index - 1}"
            indices = self.matcher(layer.logits, layer.boxes_cxcywh, targets, group_size=self.group_size)
            terms = {}
            terms["loss_ce"], error = labels_loss(layer.logits, targets, indices, self.empty_weight)
            terms["loss_bbox"], terms["loss_giou"] = boxes_loss(layer.boxes_cxcywh, targets, indices, num_boxes)
            if layer.features is not None and layer.patch_features is not None:
                terms["loss_feature"] = feature_reconstruction_loss(
                    layer.features, layer.patch_features, targets, indices, num_boxes
                )
            for name, value in terms.items():
                losses[name + suffix] = value
                total = total + self.weight_dict[name] * value
            if class_error is None:
                class_error = error
        losses["loss"] = total
        losses["class_error"] = class_error
        return losses


def build_criterion(
    loss_cfg: LossConfig,
    num_classes: int,
    *,
    group_size: int | None = None,
    eos_coef_override: float | None = None,
) -> SetCriterion:
    """Matcher + criterion from a :class:`LossConfig`.

    ``eos_coef_override`` wins over ``loss_cfg.eos_coef`` when given (pre-training passes
    M / Q there when ``loss_cfg.eos_coef`` is None); one of the two must be set.
    """
    eos_coef = eos_coef_override if eos_coef_override is not None else loss_cfg.eos_coef
    if eos_coef is None:
        raise ValueError("loss.eos_coef is None (meaning M / Q for pre-training); pass eos_coef_override")
    matcher = HungarianMatcher(loss_cfg.cost_class, loss_cfg.cost_bbox, loss_cfg.cost_giou)
    return SetCriterion(
        num_classes,
        matcher,
        loss_ce=loss_cfg.loss_ce,
        loss_bbox=loss_cfg.loss_bbox,
        loss_giou=loss_cfg.loss_giou,
        loss_feature=loss_cfg.loss_feature,
        eos_coef=eos_coef,
        group_size=group_size,
    )
