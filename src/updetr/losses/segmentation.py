"""Mask losses of DETR's panoptic head: sigmoid focal loss and dice loss on matched queries.

The queries are matched exactly as for detection (:class:`~updetr.losses.matcher.
HungarianMatcher` on classes and boxes; masks play no part in the matching). For each
matched pair the query's mask logits, bilinearly upsampled from (H/4, W/4) to the target
grid, are compared with the target mask (bool (H, W) at the transformed image size,
zero-padded bottom/right to the batch's largest target mask, as the images are padded):

- ``loss_mask``: ``torchvision.ops.sigmoid_focal_loss`` (alpha 0.25, gamma 2), averaged
  over the pixels of each mask, summed over masks / ``num_boxes``;
- ``loss_dice``: ``1 - (2 |p * t| + 1) / (|p| + |t| + 1)`` with ``p = sigmoid(logits)``,
  summed over masks / ``num_boxes``.

Both are computed on the last decoder layer only (the mask head sees only that layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from updetr.losses.criterion import SetCriterion, num_boxes_for_loss
from updetr.structures import DetectionOutput, Target

__all__ = ["SegmentationCriterion", "dice_loss", "focal_mask_loss", "matched_masks"]

Indices = list[tuple[Tensor, Tensor]]


def focal_mask_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss of (P, HW) logits against (P, HW) {0, 1} targets: per-mask pixel
    mean, summed over masks, divided by ``num_boxes``."""
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")  # (P, HW)
    return loss.mean(1).sum() / num_boxes


def dice_loss(logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """Soft dice loss of (P, HW) logits against (P, HW) {0, 1} targets, summed / ``num_boxes``."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def matched_masks(masks: Tensor, targets: list[Target], indices: Indices) -> tuple[Tensor, Tensor]:
    """Matched (predicted logits, target masks), both flattened to (P, H*W) on the target grid.

    ``masks``: (B, Q, h, w) logits; ``targets[b]["masks"]``: bool (N_b, H_b, W_b). Target
    masks are zero-padded to the largest (H, W) in the batch; the logits are upsampled
    (bilinear) to that size.
    """
    device = masks.device
    height = max(int(t["masks"].shape[-2]) for t in targets)
    width = max(int(t["masks"].shape[-1]) for t in targets)
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
    query_idx = torch.cat([q for q, _ in indices]).to(device)
    gathered = []
    for t, (_, j) in zip(targets, indices):
        m = t["masks"][j.to(t["masks"].device)].to(device, torch.float32)  # (P_b, H_b, W_b)
        gathered.append(F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])))  # (P_b, H, W)
    target_masks = torch.cat(gathered) if gathered else masks.new_zeros((0, height, width))  # (P, H, W)
    pred = masks[batch_idx, query_idx].float()  # (P, h, w)
    if pred.shape[0] == 0:
        return pred.new_zeros((0, height * width)) + pred.sum() * 0, target_masks.flatten(1)
    pred = F.interpolate(pred[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]  # (P, H, W)
    return pred.flatten(1), target_masks.flatten(1)


class SegmentationCriterion(nn.Module):
    """A :class:`SetCriterion` plus ``loss_mask`` and ``loss_dice`` on the last layer.

    Returns the set criterion's dict with ``loss_mask`` and ``loss_dice`` added, and
    ``loss`` increased by their weighted sum. The last layer is matched again with the
    same (deterministic) matcher to find the query–target pairs.

    Args:
        set_criterion: the detection criterion (owns the matcher and the class count).
        loss_mask: weight of the focal term (DETR: 1).
        loss_dice: weight of the dice term (DETR: 1).
    """

    def __init__(self, set_criterion: SetCriterion, *, loss_mask: float = 1.0, loss_dice: float = 1.0) -> None:
        super().__init__()
        self.set_criterion = set_criterion
        self.weight_dict = {**set_criterion.weight_dict, "loss_mask": loss_mask, "loss_dice": loss_dice}

    def forward(self, output: DetectionOutput, targets: list[Target]) -> dict[str, Tensor]:
        if output.masks is None:
            raise ValueError("SegmentationCriterion needs an output with masks (a DETRsegm model)")
        missing = [i for i, t in enumerate(targets) if "masks" not in t]
        if missing:
            raise ValueError(f"targets {missing} have no 'masks'; build the dataset with masks")
        losses = self.set_criterion(output, targets)
        sc = self.set_criterion
        indices = sc.matcher(output.logits, output.boxes_cxcywh, targets, group_size=sc.group_size)
        num_boxes = num_boxes_for_loss(targets, output.masks.device)
        pred, target = matched_masks(output.masks, targets, indices)
        losses["loss_mask"] = focal_mask_loss(pred, target, num_boxes)
        losses["loss_dice"] = dice_loss(pred, target, num_boxes)
        losses["loss"] = (
            losses["loss"]
            + self.weight_dict["loss_mask"] * losses["loss_mask"]
            + self.weight_dict["loss_dice"] * losses["loss_dice"]
        )
        return losses
