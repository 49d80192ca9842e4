"""Hungarian matching between predicted queries and ground-truth targets (DETR §3.1).

The cost of assigning query ``q`` to target ``n`` is::

    - cost_class * p_q(label_n) + cost_bbox * |box_q - box_n|_1 - cost_giou * GIoU(box_q, box_n)

with ``p_q`` the softmax over the C + 1 classes, L1 on normalised cxcywh and GIoU on xyxy.
The cost of the whole batch is one (B*Q, sum N) matrix, as in DETR; each image then
solves its own (Q, N) block with ``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from updetr.box_ops import cxcywh_to_xyxy, generalized_box_iou
from updetr.structures import Target

__all__ = ["HungarianMatcher", "matchable_targets"]


def matchable_targets(target: Target) -> Tensor:
    """Indices (int64, sorted) of the targets of one image the loss may use: all but crowd."""
    num = target["labels"].shape[0]
    device = target["labels"].device
    iscrowd = target.get("iscrowd")
    if iscrowd is None:
        return torch.arange(num, device=device)
    return torch.nonzero(iscrowd == 0, as_tuple=False).flatten()


class HungarianMatcher:
    """One-to-one assignment of queries to targets, minimising the DETR matching cost.

    Args:
        cost_class: weight of the (negative) class probability.
        cost_bbox: weight of the L1 distance between normalised cxcywh boxes.
        cost_giou: weight of the (negative) generalised IoU.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    def __repr__(self) -> str:
        return (
            f"HungarianMatcher(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou})"
        )

    @torch.no_grad()
    def __call__(
        self,
        logits: Tensor,
        boxes_cxcywh: Tensor,
        targets: list[Target],
        group_size: int | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch.

        Args:
            logits: (B, Q, C + 1) class logits, last index "no object".
            boxes_cxcywh: (B, Q, 4) predicted boxes, normalised cxcywh.
            targets: B targets; ``boxes_cxcywh`` (N, 4), ``labels`` (N,) in
                [0, C). Targets with ``iscrowd == 1`` are never matched.
            group_size: UP-DETR group matching. When set, the Q queries form contiguous
                groups of ``group_size`` and target ``n`` may only be matched to a query
                of group ``patch_index[n]`` (``targets[b]["patch_index"]`` when present,
                else ``n``): each target takes the cheapest query of its own group.

        Returns:
            B pairs ``(query_indices, target_indices)``, int64 CPU tensors of equal
            length sorted by query index; target indices index the image's ORIGINAL
            target list (crowd targets included in the numbering).
        """
        batch_size, num_queries, num_logits = logits.shape
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {batch_size}")
        if group_size is not None and (group_size <= 0 or num_queries % group_size):
            raise ValueError(f"group_size={group_size} must be positive and divide the {num_queries} queries")

        keep = [matchable_targets(t) for t in targets]
        sizes = [int(k.numel()) for k in keep]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in targets]

        target_labels = torch.cat([t["labels"][k] for t, k in zip(targets, keep)])  # (sum N,)
        target_boxes = torch.cat([t["boxes_cxcywh"][k] for t, k in zip(targets, keep)]).float()  # (sum N, 4)
        _check_labels(target_labels, num_logits)
        cost = self._cost_matrix(logits, boxes_cxcywh, target_labels, target_boxes)  # (B, Q, sum N), CPU

        out = []
        for b, (block, k) in enumerate(zip(cost.split(sizes, dim=-1), keep)):
            block = block[b]  # (Q, N_b)
            k = k.cpu()
            if k.numel() == 0:
                out.append((empty, empty.clone()))
            elif group_size is None:
                rows, cols = linear_sum_assignment(block.numpy())
                # rows come back sorted; cols index the matchable targets
                out.append((torch.as_tensor(rows, dtype=torch.int64), k[torch.as_tensor(cols, dtype=torch.int64)]))
            else:
                out.append(_match_in_groups(block, k, targets[b], group_size))
        return out

    def _cost_matrix(self, logits: Tensor, boxes_cxcywh: Tensor, target_labels: Tensor,
                    target_boxes: Tensor) -> Tensor:
        """The (B, Q, sum N) matching cost (module docstring) of every query against every target of the
        batch, on the CPU; ValueError when an entry is NaN or infinite."""
        batch_size, num_queries, _ = logits.shape
        prob = logits.flatten(0, 1).float().softmax(-1)  # (B*Q, C+1)
        pred_boxes = boxes_cxcywh.flatten(0, 1).float()  # (B*Q, 4)
        cost = (
            -self.cost_class * prob[:, target_labels]
            + self.cost_bbox * torch.cdist(pred_boxes, target_boxes, p=1)
            - self.cost_giou * generalized_box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(target_boxes))
        )  # (B*Q, sum N)
        cost = cost.view(batch_size, num_queries, -1).cpu()  # (B, Q, sum N)
        if not torch.isfinite(cost).all():
            raise ValueError(
                "HungarianMatcher: the matching cost has NaN/inf entries; the predicted logits or "
                "boxes are not finite, or a target box is degenerate (zero width/height)"
            )
        return cost


def _check_labels(target_labels: Tensor, num_logits: int) -> None:
    """Every target label is a class of the C = ``num_logits - 1`` (the last logit is no-object)."""
    if target_labels.min() < 0 or target_labels.max() >= num_logits - 1:
        raise ValueError(
            f"target labels must lie in [0, {num_logits - 1}) (C = {num_logits - 1} classes, "
            f"index {num_logits - 1} is no-object); got range "
            f"[{int(target_labels.min())}, {int(target_labels.max())}]"
        )


def _match_in_groups(block: Tensor, keep: Tensor, target: Target, group_size: int) -> tuple[Tensor, Tensor]:
    """Each target takes the cheapest query of its own group (a 1-row assignment per group)."""
    num_queries, num_targets = block.shape
    num_groups = num_queries // group_size
    patch_index = target.get("patch_index")
    groups = patch_index.cpu()[keep] if patch_index is not None else keep  # (N,)
    if groups.numel() and (groups.min() < 0 or groups.max() >= num_groups):
        raise ValueError(
            f"group matching: target groups {groups.tolist()} out of range for {num_queries} queries "
            f"in {num_groups} groups of {group_size}"
        )
    if groups.unique().numel() != groups.numel():
        raise ValueError(f"group matching: two targets share a query group ({groups.tolist()})")
    grouped = block.view(num_groups, group_size, num_targets)  # (G, group_size, N)
    cols = torch.arange(num_targets)
    best = grouped[groups, :, cols].argmin(dim=1)  # (N,) position inside the group
    queries = groups * group_size + best
    order = queries.argsort()
    return queries[order], keep[order]
