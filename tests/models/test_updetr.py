import pytest
import torch

from updetr.config import ModelConfig, PretrainConfig
from updetr.models import build_updetr, group_attention_mask


def tiny(num_queries=6, num_patches=3, **pre):
    model_cfg = ModelConfig(backbone="resnet18", hidden_dim=32, num_heads=4, enc_layers=1, dec_layers=2,
                            ffn_dim=64, dropout=0.0, num_queries=num_queries)
    return build_updetr(model_cfg, PretrainConfig(num_patches=num_patches, **pre))


@pytest.mark.parametrize("q,m", [(100, 10), (100, 20), (30, 3), (100, 1), (12, 12)])
def test_attention_mask_is_exactly_block_diagonal(q, m):
    mask = group_attention_mask(q, m)
    g = q // m
    assert mask.shape == (q, q) and mask.dtype == torch.bool
    assert not mask.all(dim=1).any(), "no query may be fully masked"
    expected = torch.ones(q, q, dtype=torch.bool)
    for j in range(m):
        expected[j * g:(j + 1) * g, j * g:(j + 1) * g] = False
    assert torch.equal(mask, expected)


def test_attention_mask_rejects_non_divisor():
    with pytest.raises(ValueError, match="must divide"):
        group_attention_mask(100, 7)


def test_groups_do_not_interact_through_self_attention():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    patches = torch.randn(1, 3, 3, 32, 32)
    base = model(x, patches)
    perturbed = patches.clone()
    perturbed[0, 1] = torch.randn(3, 32, 32)
    out = model(x, perturbed)
    delta = (out.logits - base.logits).abs().sum(-1)[0]  # (Q,)
    assert delta[2:4].sum() > 0, "the perturbed group must change"
    assert torch.allclose(delta[[0, 1, 4, 5]], torch.zeros(4), atol=1e-5)
    # without the mask the groups do interact
    model.attention_mask = False
    delta = (model(x, perturbed).logits - model(x, patches).logits).abs().sum(-1)[0]
    assert delta[[0, 1, 4, 5]].sum() > 1e-6


def test_frozen_cnn_gets_no_gradient_and_pretext_heads_do():
    model = tiny().train()
    out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 3, 32, 32))
    assert out.logits.shape == (2, 6, 2) and out.features.shape == (2, 6, 512)
    assert out.patch_features.shape == (2, 3, 512) and not out.patch_features.requires_grad
    loss = out.logits.sum() + out.boxes_cxcywh.sum() + out.features.sum() + sum(a.features.sum() + a.logits.sum() + a.boxes_cxcywh.sum() for a in out.aux)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("backbone.0."))
    for name in ["patch2query.weight", "feature_align.layers.1.weight", "query_embed.weight", "input_proj.weight"]:
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_inference_with_fewer_patches_uses_first_groups():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    patches = torch.randn(1, 3, 3, 32, 32)
    full = model(x, patches)
    two = model(x, patches[:, :2])
    assert two.logits.shape == (1, 4, 2)
    # the mask isolates groups, so the first two groups' predictions are unchanged
    torch.testing.assert_close(two.logits, full.logits[:, :4], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most M"):
        model(x, torch.randn(1, 4, 3, 32, 32))
    model.train()
    with pytest.raises(ValueError, match="exactly M"):
        model(x, patches[:, :2])


def test_patch_drop_and_shuffle_only_in_training():
    model = tiny(patch_drop_ratio=0.5, query_shuffle=True)
    x = torch.randn(1, 3, 64, 64)
    patches = torch.randn(1, 3, 3, 32, 32)
    model.eval()
    a, b = model(x, patches), model(x, patches)
    torch.testing.assert_close(a.logits, b.logits)
    model.train()
    torch.manual_seed(1)
    c = model(x, patches)
    torch.manual_seed(2)
    d = model(x, patches)
    assert not torch.allclose(c.logits, d.logits)


@pytest.mark.slow
def test_pretrain_keys_match_published_layout():
    cfg = ModelConfig(num_queries=100, pre_norm=True)
    keys = build_updetr(cfg, PretrainConfig()).state_dict()
    assert keys["patch2query.weight"].shape == (256, 2048)
    assert keys["feature_align.layers.0.weight"].shape == (256, 256)
    assert keys["feature_align.layers.1.weight"].shape == (2048, 256)
    assert keys["class_embed.weight"].shape == (2, 256)
    no_recon = build_updetr(cfg, PretrainConfig(feature_reconstruction=False)).state_dict()
    assert not any(k.startswith("feature_align") for k in no_recon)
