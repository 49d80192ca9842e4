"""One-shot model: shapes, live conditioning on the query patch, gradients, initialisation from checkpoints."""

import pytest
import torch

from updetr.config import ModelConfig, PretrainConfig
from updetr.engine.checkpoint import CheckpointError, save_checkpoint
from updetr.models import build_detr, build_updetr
from updetr.models.one_shot import build_one_shot, init_one_shot_from_checkpoint

CFG = ModelConfig(backbone="resnet18", hidden_dim=32, num_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64,
                  dropout=0.0, num_queries=6)


def test_output_shapes_and_binary_head():
    model = build_one_shot(CFG, train_backbone=False).eval()
    out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 6, 2) and out.boxes_cxcywh.shape == (2, 6, 4)
    assert out.patch_features.shape == (2, 1, 512) and len(out.aux) == 1
    same = model(torch.randn(2, 3, 64, 64), torch.randn(2, 1, 3, 32, 32))  # (B, 1, 3, h, w) accepted too
    assert same.logits.shape == (2, 6, 2)
    with pytest.raises(ValueError, match="one query patch per image"):
        model(torch.randn(2, 3, 64, 64), torch.randn(2, 2, 3, 32, 32))
    with pytest.raises(ValueError, match="3 query patches for 2 images"):
        model(torch.randn(2, 3, 64, 64), torch.randn(3, 3, 32, 32))


def test_query_patch_conditions_every_query_and_only_its_image():
    model = build_one_shot(CFG, train_backbone=False).eval()
    images, patches = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)
    base = model(images, patches)
    perturbed = patches.clone()
    perturbed[1] += torch.randn(3, 32, 32)
    out = model(images, perturbed)
    delta = (out.logits - base.logits).abs().sum(-1)  # (B, Q)
    assert (delta[1] > 1e-6).all(), "every query of the perturbed image must change"
    assert torch.allclose(delta[0], torch.zeros(6), atol=1e-6), "other images are unaffected"
    assert not torch.allclose(out.boxes_cxcywh[1], base.boxes_cxcywh[1])


def test_gradients_reach_patch2query_and_a_frozen_cnn_gets_none():
    model = build_one_shot(CFG, train_backbone=False).train()
    out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32))
    (out.logits.sum() + out.boxes_cxcywh.sum() + sum(a.logits.sum() + a.boxes_cxcywh.sum() for a in out.aux)).backward()
    params = dict(model.named_parameters())
    for name in ("patch2query.weight", "query_embed.weight", "class_embed.weight", "input_proj.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in params.items() if n.startswith("backbone."))
    trainable = build_one_shot(CFG, train_backbone=True)
    assert trainable.backbone[0].body.layer4[0].conv1.weight.requires_grad


def test_init_from_updetr_pretraining_keeps_patch2query(tmp_path):
    pretrained = build_updetr(CFG, PretrainConfig(num_patches=3))
    save_checkpoint(tmp_path / "pre.pth", {"model": pretrained.state_dict(), "task": "pretrain"})
    model = build_one_shot(CFG, train_backbone=False)
    fresh_class = model.class_embed.weight.clone()
    report = init_one_shot_from_checkpoint(model, tmp_path / "pre.pth")
    assert report["kind"] == "updetr-pretrain"
    assert report["kept_fresh"] == ["class_embed.bias", "class_embed.weight"]
    assert any(k.startswith("feature_align.") for k in report["dropped"])
    source = pretrained.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("class_embed."):
            assert torch.equal(value, source[key]), key
    assert torch.equal(model.patch2query.weight, pretrained.patch2query.weight)
    assert torch.equal(model.class_embed.weight, fresh_class)


@pytest.mark.slow
def test_init_from_detection_checkpoint_starts_patch2query_fresh(tmp_path):
    detr = build_detr(CFG, num_classes=5)
    save_checkpoint(tmp_path / "det.pth", {"model": detr.state_dict(), "task": "detection"})
    model = build_one_shot(CFG, train_backbone=False)
    report = init_one_shot_from_checkpoint(model, tmp_path / "det.pth")
    assert report["kind"] == "detection" and "patch2query.weight" in report["kept_fresh"]
    assert torch.equal(model.transformer.state_dict()["decoder.norm.weight"], detr.transformer.state_dict()["decoder.norm.weight"])
    other = build_detr(ModelConfig(**{**CFG.__dict__, "pre_norm": True}), num_classes=5)
    save_checkpoint(tmp_path / "prenorm.pth", {"model": other.state_dict()})
    with pytest.raises(CheckpointError, match="encoder.norm"):
        init_one_shot_from_checkpoint(build_one_shot(CFG, train_backbone=False), tmp_path / "prenorm.pth")
