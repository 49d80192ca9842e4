"""The mask losses: focal and DICE terms, matched masks padded to the batch, SegmentationCriterion over DETR's."""

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from updetr.config import ModelConfig
from updetr.losses.criterion import SetCriterion
from updetr.losses.matcher import HungarianMatcher
from updetr.losses.segmentation import SegmentationCriterion, dice_loss, focal_mask_loss, matched_masks
from updetr.models import build_detr
from updetr.models.segmentation import DETRsegm

# on one thread, as under tests/models/ where they were (the criterion test runs a small model)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_segm(freeze_detr=False, train_backbone=True, num_classes=4) -> DETRsegm:
    """The mask head on a narrow DETR, as in tests/models/test_segmentation.py."""
    cfg = ModelConfig(backbone="resnet18", hidden_dim=32, num_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64,
                      dropout=0.1, num_queries=5)
    return DETRsegm(build_detr(cfg, num_classes, train_backbone=train_backbone, return_interm_layers=True),
                    freeze_detr=freeze_detr)


def test_focal_and_dice_losses():
    logits = torch.tensor([[8.0, -8.0, 8.0, -8.0]])
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert dice_loss(logits, target, 1.0) < 1e-3
    assert dice_loss(-logits, target, 1.0) > 0.6
    expected = sigmoid_focal_loss(-logits, target, alpha=0.25, gamma=2, reduction="none").mean(1).sum() / 2.0
    torch.testing.assert_close(focal_mask_loss(-logits, target, 2.0), expected)


def test_matched_masks_pad_targets_to_the_batch():
    masks = torch.randn(2, 3, 4, 6)  # (B, Q, h, w)
    targets = [{"masks": torch.ones(2, 16, 20, dtype=torch.bool)}, {"masks": torch.ones(1, 12, 24, dtype=torch.bool)}]
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([1]), torch.tensor([0]))]
    pred, target = matched_masks(masks, targets, indices)
    assert pred.shape == (3, 16 * 24) and target.shape == (3, 16 * 24)
    target = target.view(3, 16, 24)
    assert target[0, :, 20:].sum() == 0 and target[0, :, :20].all()  # zero padding on the right
    assert target[2, 12:].sum() == 0


def test_segmentation_criterion_adds_mask_terms():
    model = tiny_segm(freeze_detr=True, train_backbone=False)
    out = model(torch.randn(2, 3, 64, 64))
    masks0 = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks0[0, :20, :30] = True
    masks0[1, 30:, 10:] = True
    targets = [
        {"labels": torch.tensor([0, 3]), "boxes_cxcywh": torch.tensor([[0.25, 0.15, 0.45, 0.3], [0.6, 0.75, 0.8, 0.5]]),
         "iscrowd": torch.tensor([0, 0]), "masks": masks0},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes_cxcywh": torch.zeros(0, 4), "iscrowd": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 64, 64, dtype=torch.bool)},
    ]
    base = SetCriterion(4, HungarianMatcher())
    criterion = SegmentationCriterion(base, loss_mask=2.0, loss_dice=3.0)
    losses = criterion(out, targets)
    plain = base(out, targets)
    assert {"loss_mask", "loss_dice"} <= set(losses)
    torch.testing.assert_close(losses["loss"], plain["loss"] + 2 * losses["loss_mask"] + 3 * losses["loss_dice"])
    losses["loss"].backward()
    assert model.mask_head.out_lay.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="masks"):
        criterion(out, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
