"""DETR's mask head: shapes, state-dict layout, per-head attention softmax, gradients, losses."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from updetr.config import ModelConfig
from updetr.losses.criterion import SetCriterion
from updetr.losses.matcher import HungarianMatcher
from updetr.losses.segmentation import SegmentationCriterion, dice_loss, focal_mask_loss, matched_masks
from updetr.models import build_detr
from updetr.models.segmentation import DETRsegm, MaskHeadSmallConv, MHAttentionMap


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", hidden_dim=32, num_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64,
                dropout=0.1, num_queries=5)
    base.update(kw)
    return ModelConfig(**base)


def tiny_segm(freeze_detr=False, train_backbone=True, num_classes=4) -> DETRsegm:
    detr = build_detr(tiny_cfg(), num_classes, train_backbone=train_backbone, return_interm_layers=True)
    return DETRsegm(detr, freeze_detr=freeze_detr)


def test_mask_logits_at_quarter_resolution():
    model = tiny_segm()
    out = model(torch.randn(2, 3, 64, 96))
    assert out.masks.shape == (2, 5, 16, 24)
    assert out.logits.shape == (2, 5, 5) and out.boxes.shape == (2, 5, 4) and len(out.aux) == 1
    assert out.aux[0].masks is None  # masks come from the last decoder layer only
    assert torch.isfinite(out.masks).all()


def test_state_dict_layout_is_detrs():
    model = tiny_segm()
    keys = list(model.state_dict())
    assert all(k.startswith(("detr.", "bbox_attention.", "mask_head.")) for k in keys)
    detr_keys = {k.removeprefix("detr.") for k in keys if k.startswith("detr.")}
    assert detr_keys == set(build_detr(tiny_cfg(), 4).state_dict())  # a plain DETR's keys under detr.
    head = {k.split(".")[0] + "." + k.split(".")[1] for k in keys if not k.startswith("detr.")}
    expected = {f"bbox_attention.{n}" for n in ("q_linear", "k_linear")}
    expected |= {f"mask_head.{n}" for n in ["lay1", "lay2", "lay3", "lay4", "lay5", "gn1", "gn2", "gn3", "gn4", "gn5",
                                            "out_lay", "adapter1", "adapter2", "adapter3"]}
    assert head == expected


def test_published_r50_shapes():
    cfg = ModelConfig(backbone="resnet50", enc_layers=1, dec_layers=1)  # D=256, 8 heads as the paper
    state = DETRsegm(build_detr(cfg, 250, return_interm_layers=True)).state_dict()
    assert state["mask_head.lay1.weight"].shape == (264, 264, 3, 3)
    assert state["mask_head.lay2.weight"].shape == (128, 264, 3, 3)
    assert state["mask_head.lay5.weight"].shape == (16, 32, 3, 3)
    assert state["mask_head.out_lay.weight"].shape == (1, 16, 3, 3)
    assert state["mask_head.adapter1.weight"].shape == (128, 1024, 1, 1)
    assert state["mask_head.adapter3.weight"].shape == (32, 256, 1, 1)
    assert state["bbox_attention.k_linear.weight"].shape == (256, 256)
    assert state["detr.class_embed.weight"].shape == (251, 256)


def test_attention_softmax_is_per_head_and_ignores_padding():
    attn = MHAttentionMap(16, 16, num_heads=4)
    queries, memory = torch.randn(2, 3, 16), torch.randn(2, 16, 4, 5)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    weights = attn(queries, memory, mask)  # (B, Q, nh, h, w)
    assert weights.shape == (2, 3, 4, 4, 5)
    torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(2, 3, 4))  # each head sums to 1
    assert weights[1, :, :, :, 3:].abs().max() == 0
    joint = MHAttentionMap(16, 16, num_heads=4, per_head_softmax=False)
    joint.load_state_dict(attn.state_dict())
    torch.testing.assert_close(joint(queries, memory, mask).sum((-3, -2, -1)), torch.ones(2, 3))  # DETR's original


def _perturb_biases(model):
    with torch.no_grad():  # move off the zero-bias initialisation, where some gradients vanish exactly
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.normal_(0, 0.1)


def test_joint_training_reaches_every_trainable_parameter():
    model = tiny_segm()
    _perturb_biases(model)
    out = model(torch.randn(2, 3, 64, 64))
    loss = out.masks.sum() + out.logits.sum() + out.boxes.sum() + sum(a.logits.sum() + a.boxes.sum() for a in out.aux)
    loss.backward()
    zero_by_design = {"detr.transformer.decoder.layers.0.self_attn.in_proj_weight"}  # see test_detr
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and (name in zero_by_design or p.grad.abs().sum() > 0), name
    assert any(p.requires_grad for n, p in model.named_parameters() if ".layer3." in n)


def test_frozen_detector_gets_no_gradient_and_no_dropout():
    model = tiny_segm(freeze_detr=True, train_backbone=False)
    _perturb_biases(model)
    model.train()
    assert not model.detr.training and model.mask_head.training
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bbox_attention", "mask_head"}
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.masks.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("detr."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.testing.assert_close(model(x).logits, out.logits)  # the detector is deterministic (eval mode)


def test_mask_head_learns_query_specific_masks():
    """Each query attends to one stride-32 cell; the head must output that cell's region, per query."""
    torch.manual_seed(0)
    d, heads, queries = 32, 4, 4
    head = MaskHeadSmallConv(d + heads, [32, 16, 8], d)
    features = torch.randn(1, d, 2, 3)  # (B, D, h, w) stride 32
    fpns = [torch.randn(1, 32, 4, 6), torch.randn(1, 16, 8, 12), torch.randn(1, 8, 16, 24)]  # layers 3, 2, 1
    attention = torch.zeros(1, queries, heads, 2, 3)
    for q, (y, x) in enumerate([(0, 0), (1, 2), (0, 2), (1, 1)]):
        attention[0, q, :, y, x] = 1.0
    target = F.interpolate(attention[0, :, :1], size=(16, 24), mode="nearest")[:, 0].flatten(1)  # (Q, H/4 * W/4)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = dice_loss(head(features, attention, fpns).flatten(1), target, queries)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # typically 0.74 -> 0.23


# ------------------------------------------------------------------------------------ losses
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
        {"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[0.25, 0.15, 0.45, 0.3], [0.6, 0.75, 0.8, 0.5]]),
         "iscrowd": torch.tensor([0, 0]), "masks": masks0},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4), "iscrowd": torch.zeros(0, dtype=torch.int64),
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
