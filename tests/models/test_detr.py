import pytest
import torch

from updetr.config import ModelConfig
from updetr.models import build_detr
from updetr.models.position_encoding import PositionEmbeddingSine
from updetr.structures import ImageBatch


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", hidden_dim=32, num_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64,
                dropout=0.0, num_queries=6)
    base.update(kw)
    return ModelConfig(**base)


def test_output_shapes_and_aux():
    model = build_detr(tiny_cfg(), num_classes=5)
    out = model(torch.randn(2, 3, 64, 96))
    assert out.logits.shape == (2, 6, 6)
    assert out.boxes_cxcywh.shape == (2, 6, 4)
    assert ((out.boxes_cxcywh >= 0) & (out.boxes_cxcywh <= 1)).all()
    assert len(out.aux) == 1 and out.aux[0].logits.shape == (2, 6, 6)
    no_aux = build_detr(tiny_cfg(aux_loss=False), num_classes=5)
    assert no_aux(torch.randn(1, 3, 64, 64)).aux == []


@pytest.mark.parametrize("train_backbone", [True, False])
def test_gradient_reaches_every_trainable_parameter_and_no_frozen_one(train_backbone):
    model = build_detr(tiny_cfg(), num_classes=3, train_backbone=train_backbone)
    with torch.no_grad():  # move off the zero-bias initialisation, where some gradients vanish exactly
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.normal_(0, 0.1)
    out = model(torch.randn(2, 3, 64, 64))
    loss = out.logits.sum() + out.boxes_cxcywh.sum() + sum(a.logits.sum() + a.boxes_cxcywh.sum() for a in out.aux)
    loss.backward()
    # DETR's decoder input starts at zero, so the first decoder self-attention sees identical
    # values for every query: its input projection gets an all-zero gradient by design.
    zero_by_design = {"transformer.decoder.layers.0.self_attn.in_proj_weight"}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert name in zero_by_design or p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    if train_backbone:
        assert any(".layer2." in n for n in trainable) and any(".layer4." in n for n in trainable)
        assert not any(".layer1." in n or ".conv1." in n.split("body")[1][:7] for n in trainable)
    else:
        assert not trainable


def test_transformer_ignores_padded_positions():
    """Features at padded positions (mask True) cannot influence the output: mask polarity is right."""
    model = build_detr(tiny_cfg(), num_classes=3).eval()
    src = torch.randn(1, 32, 4, 5)
    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    mask[:, :, 3:] = True  # the last two columns are padding
    pos = model.backbone[1](mask)
    query_pos = model.query_embed.weight.unsqueeze(0)
    hs, _ = model.transformer(src, mask, pos, query_pos)
    garbage = src.clone()
    garbage[..., 3:] = 100 * torch.randn(1, 32, 4, 2)
    hs2, _ = model.transformer(garbage, mask, pos, query_pos)
    torch.testing.assert_close(hs, hs2)
    unmasked, _ = model.transformer(garbage, torch.zeros_like(mask), pos, query_pos)
    assert not torch.allclose(hs, unmasked)
    batch = ImageBatch.from_tensors([torch.randn(3, 64, 64), torch.randn(3, 96, 128)])
    assert batch.padding_mask[0, 70:, :].all() and not batch.padding_mask[0, :64, :64].any()
    assert batch.image_sizes.tolist() == [[64, 64], [96, 128]]


def test_pre_norm_has_final_encoder_norm_post_norm_not():
    post = build_detr(tiny_cfg(pre_norm=False), num_classes=3).state_dict()
    pre = build_detr(tiny_cfg(pre_norm=True), num_classes=3).state_dict()
    assert "transformer.encoder.norm.weight" in pre and "transformer.encoder.norm.weight" not in post
    assert "transformer.decoder.norm.weight" in pre and "transformer.decoder.norm.weight" in post
    assert set(pre) - set(post) == {"transformer.encoder.norm.weight", "transformer.encoder.norm.bias"}


def test_state_dict_uses_published_key_layout():
    keys = build_detr(ModelConfig(num_queries=100), num_classes=91).state_dict()
    for key in ["backbone.0.body.conv1.weight", "backbone.0.body.bn1.running_var",
                "backbone.0.body.layer4.2.conv3.weight", "backbone.0.body.layer1.0.downsample.1.weight",
                "input_proj.weight", "query_embed.weight", "class_embed.weight", "bbox_embed.layers.2.bias",
                "transformer.encoder.layers.5.self_attn.in_proj_weight", "transformer.decoder.layers.5.multihead_attn.out_proj.bias",
                "transformer.decoder.layers.0.norm3.weight", "transformer.decoder.norm.bias"]:
        assert key in keys, key
    assert not any("num_batches_tracked" in k for k in keys)
    assert keys["class_embed.weight"].shape == (92, 256)
    assert keys["input_proj.weight"].shape == (256, 2048, 1, 1)


def test_extra_query_embedding_and_self_attention_mask_are_used():
    model = build_detr(tiny_cfg(), num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    base = model(x)
    extra = torch.zeros(1, 6, 32)
    extra[0, 2] = 1.0
    shifted = model(x, query_extra=extra)
    changed = (shifted.logits - base.logits).abs().sum(-1)[0]
    assert changed[2] > 0
    # without a mask query 2 also influences the others through self-attention
    assert changed[torch.arange(6) != 2].sum() > 0
    mask = ~torch.eye(6, dtype=torch.bool)  # each query attends only to itself
    a = model(x, self_attn_mask=mask)
    b = model(x, query_extra=extra, self_attn_mask=mask)
    diff = (a.logits - b.logits).abs().sum(-1)[0]
    assert diff[2] > 0 and torch.allclose(diff[torch.arange(6) != 2], torch.zeros(5), atol=1e-6)


def test_sine_position_encoding_normalised_over_unpadded_area():
    enc = PositionEmbeddingSine(8, normalize=True)
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, :, 3:] = True
    pos = enc(mask)
    assert pos.shape == (1, 16, 4, 6)
    full = enc(torch.zeros(1, 4, 3, dtype=torch.bool))
    torch.testing.assert_close(pos[..., :3], full)


def test_learned_position_encoding_and_dc5():
    model = build_detr(tiny_cfg(position_embedding="learned"), num_classes=2)
    assert "backbone.1.row_embed.weight" in model.state_dict()
    assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 6, 3)
    with pytest.raises(ValueError, match="DC5"):
        build_detr(tiny_cfg(dilation=True), num_classes=2)


def test_stage3_backbone_gives_stride_16_features_and_loads_full_resnet_weights(tmp_path):
    import torchvision

    from updetr.config import ConfigError
    from updetr.presets import make_config
    from updetr.models.backbone import build_backbone

    model = build_detr(tiny_cfg(backbone_stage=3), num_classes=2)
    hidden = model.forward_hidden(torch.randn(1, 3, 64, 96))
    assert hidden.memory.shape[1] == (64 // 16) * (96 // 16)  # tokens of a stride-16 map
    assert not any(k.startswith("backbone.0.body.layer4") for k in model.state_dict())
    assert model.input_proj.in_channels == 256
    # a whole ResNet-18 state dict (layer4 and fc included) loads into the truncated CNN
    full = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(full, tmp_path / "r18.pth")
    joiner = build_backbone("resnet18", hidden_dim=32, weights=str(tmp_path / "r18.pth"), last_stage=3)
    torch.testing.assert_close(joiner.body.body.layer3[0].conv1.weight, full["layer3.0.conv1.weight"])
    with pytest.raises(ConfigError, match="backbone_stage"):
        make_config("small", overrides=["model.backbone_stage=2"])
    with pytest.raises(ConfigError, match="DC5"):
        make_config("r50", overrides=["model.backbone_stage=3", "model.dilation=true"])


def test_unpadded_frozen_backbone_matches_each_image_alone():
    from updetr.data.collate import collate_detection

    torch.manual_seed(0)
    model = build_detr(tiny_cfg(backbone_unpadded=True), num_classes=2, train_backbone=False).eval()
    padded = build_detr(tiny_cfg(), num_classes=2, train_backbone=False).eval()
    padded.load_state_dict(model.state_dict())
    sizes = [(64, 128), (128, 64), (64, 64)]  # multiples of 64: each image's own area is exact
    images = [torch.randn(3, h, w) for h, w in sizes]
    batch, _ = collate_detection([(img, {"boxes_cxcywh": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}) for img in images])
    (feature, mask), = model.backbone.body(batch)
    assert feature.shape[-2:] == (4, 4)
    for i, img in enumerate(images):
        alone = padded.backbone.body.body(img[None])["0"]
        h, w = alone.shape[-2:]
        torch.testing.assert_close(feature[i, :, :h, :w], alone[0], rtol=1e-4, atol=1e-4)
        assert not mask[i, :h, :w].any() and mask[i].sum() == 16 - h * w
        assert feature[i][:, mask[i]].abs().sum() == 0  # nothing computed on padding
    out = model(batch)
    assert out.logits.shape == (3, 6, 3) and torch.isfinite(out.boxes_cxcywh).all()
