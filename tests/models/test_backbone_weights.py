"""Backbone weights from local files (torchvision, SwAV, wrapped) and the offline failures.

Nothing here touches the network: ``imagenet``/``swav`` are tested with the downloaders
patched to raise ``URLError``, the way they fail on an offline machine.
"""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torch
import torchvision

from updetr.config import ModelConfig
from updetr.models import build_detr
from updetr.models.backbone import SWAV_URL, Backbone, BackboneWeightsError, load_backbone_weights


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Every download path of torch.hub / torchvision raises, as on a machine without network."""

    def refuse(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", refuse)


def torchvision_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict (with ``fc`` and ``num_batches_tracked``), random values."""
    torch.manual_seed(seed)
    state = getattr(torchvision.models, name)(weights=None).state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif key.endswith("running_mean"):
            value.normal_(0, 0.1)
    return state


def assert_landed(backbone: Backbone, source: dict[str, torch.Tensor]) -> None:
    body = backbone.body.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer4.1.bn2.weight", "layer4.0.downsample.0.weight"):
        assert torch.equal(body[key], source[key]), key
    assert all(torch.equal(body[k], source[k]) for k in body)


@pytest.mark.slow
def test_torchvision_file_with_fc(tmp_path):
    source = torchvision_state("resnet18")
    assert "fc.weight" in source and any(k.endswith("num_batches_tracked") for k in source)
    path = tmp_path / "resnet18.pth"
    torch.save(source, path)
    backbone = Backbone("resnet18", trainable=False)
    assert not torch.equal(backbone.body.state_dict()["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    load_backbone_weights(backbone, str(path))
    assert_landed(backbone, source)
    # the same file through the model config
    model = build_detr(ModelConfig(backbone="resnet18", backbone_weights=str(path), hidden_dim=32, num_heads=4,
                                   enc_layers=1, dec_layers=1, ffn_dim=64, num_queries=4), num_classes=2)
    assert_landed(model.backbone.body, source)


@pytest.mark.slow
def test_swav_style_file(tmp_path):
    """The SwAV release: ``module.``-prefixed ResNet-50 keys plus projection head and prototypes."""
    source = torchvision_state("resnet50", seed=1)
    swav = {"module." + k: v for k, v in source.items() if not k.startswith("fc.")}
    swav["module.projection_head.0.weight"] = torch.randn(2048, 2048)
    swav["module.projection_head.0.bias"] = torch.randn(2048)
    swav["module.prototypes.weight"] = torch.randn(3000, 128)
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(swav, path)
    backbone = Backbone("resnet50", trainable=False)
    load_backbone_weights(backbone, str(path))
    assert_landed(backbone, source)


def test_wrapped_state_dict(tmp_path):
    source = torchvision_state("resnet18", seed=2)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": source, "epoch": 90, "arch": "resnet18"}, path)
    backbone = Backbone("resnet18", trainable=True)
    load_backbone_weights(backbone, str(path))
    assert_landed(backbone, source)


@pytest.mark.slow
def test_wrong_architecture_lists_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision_state("resnet34"), path)
    with pytest.raises(BackboneWeightsError, match=r"resnet34.pth.*do not fit resnet18.*unexpected layer1\.2\."):
        load_backbone_weights(Backbone("resnet18", trainable=False), str(path))
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_state("resnet50"), path)
    with pytest.raises(BackboneWeightsError, match=r"resnet50.pth.*unexpected layer1\.0\.bn3\..*wrong shape layer1\.0\.conv1\.weight"):
        load_backbone_weights(Backbone("resnet18", trainable=False), str(path))
    partial = {k: v for k, v in torchvision_state("resnet18").items() if not k.startswith("layer4.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(BackboneWeightsError, match=r"missing layer4\.1\."):
        load_backbone_weights(Backbone("resnet18", trainable=False), str(tmp_path / "partial.pth"))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(BackboneWeightsError, match="nope.pth.*neither none/imagenet/swav nor an existing file"):
        load_backbone_weights(Backbone("resnet18", trainable=False), str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="junk.pth: not a PyTorch backbone weights file"):
        load_backbone_weights(Backbone("resnet18", trainable=False), str(tmp_path / "junk.pth"))


def test_imagenet_offline_says_how_to_pass_a_file():
    with pytest.raises(BackboneWeightsError) as info:
        load_backbone_weights(Backbone("resnet18", trainable=False), "imagenet")
    message = str(info.value)
    assert "Temporary failure in name resolution" in message
    assert "download.pytorch.org" in message and "model.backbone_weights=/path/to/" in message


def test_swav_offline_says_how_to_pass_a_file():
    with pytest.raises(BackboneWeightsError) as info:
        load_backbone_weights(Backbone("resnet50", trainable=False), "swav")
    message = str(info.value)
    assert SWAV_URL in message and "model.backbone_weights=/path/to/swav_800ep_pretrain.pth.tar" in message
    with pytest.raises(BackboneWeightsError, match="resnet50 only"):
        load_backbone_weights(Backbone("resnet18", trainable=False), "swav")
