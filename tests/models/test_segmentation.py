"""DETR's mask head: shapes, state-dict layout, per-head attention softmax, gradients."""

import pytest
import torch
import torch.nn.functional as F

from updetr.config import ModelConfig
from updetr.losses.segmentation import dice_loss
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
    assert out.logits.shape == (2, 5, 5) and out.boxes_cxcywh.shape == (2, 5, 4) and len(out.aux) == 1
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
    loss = out.masks.sum() + out.logits.sum() + out.boxes_cxcywh.sum() + sum(a.logits.sum() + a.boxes_cxcywh.sum() for a in out.aux)
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


@pytest.mark.slow
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
