"""Official DETR / UP-DETR checkpoints: architecture inference, strict loading, conversion.

Nothing can be downloaded here, so the test carries its own minimal re-implementation of
the authors' forward pass (``reference_forward``), written from docs/method.md §1 and §5:
sequence-first (S, B, D) tensors, ``multi_head_attention_forward`` with float -inf masks,
FrozenBatchNorm as ``x * scale + bias`` (eps 1e-5), the query embedding repeated over
the batch, ``tgt = 0``, every decoder output through ``decoder.norm``; for UP-DETR the
patch features through the ResNet body + global average pooling, ``patch2query``,
``repeat_interleave(Q // M)`` groups and the block-diagonal mask (the correct loop over
patches). Random weights are generated directly in the published key layout (§5), not
from our model, so a renamed key on our side fails the test.
"""

from __future__ import annotations

import argparse
import functools
import math
import pickle
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from updetr.engine.checkpoint import CheckpointError
from updetr.engine.inference import load_trained
from updetr.config import ConfigError
from updetr.models import DETR, UPDETR
from updetr.models.official import (
    convert_official_checkpoint,
    load_official_checkpoint,
    parse_overrides,
    read_official_checkpoint,
)
from updetr.structures import ImageBatch

ATOL = RTOL = 1e-5
BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


@dataclass(frozen=True)
class Arch:
    """What the authors' argparse flags would say about a checkpoint."""

    backbone: str = "resnet50"
    hidden: int = 64
    heads: int = 8
    ffn: int = 128
    enc: int = 2
    dec: int = 2
    queries: int = 10
    rows: int = 92  # class_embed rows (C + 1)
    pre_norm: bool = False
    learned_pos: bool = False
    dilation: bool = False
    pretrain: bool = False
    feature_align: bool = False
    patches: int = 10  # M

    @property
    def bottleneck(self) -> bool:
        return self.backbone in ("resnet50", "resnet101")

    @property
    def channels(self) -> int:
        return 2048 if self.bottleneck else 512


# ----------------------------------------------------------------------------- published layout
def published_state_dict(a: Arch, seed: int = 0, values: bool = True) -> dict[str, Tensor]:
    """Random weights under the key names and shapes of docs/method.md §5 (cached; never mutate).

    ``values=False`` gives shape-only tensors (a broadcast zero: tiny on disk) for tests
    that only read the architecture.
    """
    body = _published_backbone(a.backbone, seed, values)
    return {**body, **_published_heads(a, seed, values)}


class _Maker:
    """Fills a state dict with seeded random tensors (or shape-only zeros)."""

    def __init__(self, seed: int, values: bool):
        self.g = torch.Generator().manual_seed(seed)
        self.values = values
        self.sd: dict[str, Tensor] = {}

    def rand(self, *shape, std=1.0, low=None):
        if not self.values:
            return torch.zeros(1).expand(*shape)
        if low is not None:  # uniform in [low, low + std)
            return low + std * torch.rand(*shape, generator=self.g)
        return torch.randn(*shape, generator=self.g) * std

    def conv(self, name, cout, cin, k):
        self.sd[name] = self.rand(cout, cin, k, k, std=math.sqrt(2.0 / (cin * k * k)))

    def bn(self, name, c, gain=1.0):
        self.sd[name + ".weight"] = self.rand(c, std=0.5 * gain, low=0.5 * gain)
        self.sd[name + ".bias"] = self.rand(c, std=0.1)
        self.sd[name + ".running_mean"] = self.rand(c, std=0.1)
        self.sd[name + ".running_var"] = self.rand(c, std=1.0, low=0.5)

    def linear(self, name, cout, cin):
        self.sd[name + ".weight"] = self.rand(cout, cin, std=1 / math.sqrt(cin))
        self.sd[name + ".bias"] = self.rand(cout, std=0.1)

    def norm(self, name, c):
        self.sd[name + ".weight"] = 1 + self.rand(c, std=0.1)
        self.sd[name + ".bias"] = self.rand(c, std=0.1)

    def attention(self, name, d):
        self.sd[name + ".in_proj_weight"] = self.rand(3 * d, d, std=1 / math.sqrt(d))
        self.sd[name + ".in_proj_bias"] = self.rand(3 * d, std=0.1)
        self.linear(name + ".out_proj", d, d)


@functools.lru_cache(maxsize=None)
def _published_backbone(backbone: str, seed: int, values: bool) -> dict[str, Tensor]:
    """``backbone.0.body.*``: torchvision ResNet (v1.5) up to layer4, FrozenBN without num_batches_tracked."""
    mk = _Maker(seed, values)
    bottleneck = backbone in ("resnet50", "resnet101")
    body = "backbone.0.body."
    mk.conv(body + "conv1.weight", 64, 3, 7)
    mk.bn(body + "bn1", 64)
    inplanes = 64
    for stage, n in enumerate(BLOCKS[backbone], 1):
        planes = 64 * 2 ** (stage - 1)
        out = planes * 4 if bottleneck else planes
        for i in range(n):
            p = f"{body}layer{stage}.{i}."
            cin = inplanes if i == 0 else out
            if bottleneck:
                mk.conv(p + "conv1.weight", planes, cin, 1)
                mk.bn(p + "bn1", planes)
                mk.conv(p + "conv2.weight", planes, planes, 3)
                mk.bn(p + "bn2", planes)
                mk.conv(p + "conv3.weight", out, planes, 1)
                mk.bn(p + "bn3", out, gain=0.2)  # small residual branches keep activations O(1)
            else:
                mk.conv(p + "conv1.weight", planes, cin, 3)
                mk.bn(p + "bn1", planes)
                mk.conv(p + "conv2.weight", planes, planes, 3)
                mk.bn(p + "bn2", planes, gain=0.2)
            if i == 0 and (stage > 1 or cin != out):
                mk.conv(p + "downsample.0.weight", out, cin, 1)
                mk.bn(p + "downsample.1", out)
        inplanes = out
    return mk.sd


@functools.lru_cache(maxsize=None)
def _published_heads(a: Arch, seed: int, values: bool) -> dict[str, Tensor]:
    """Position embedding, input projection, queries, heads and transformer."""
    mk = _Maker(seed + 1, values)
    d = a.hidden
    if a.learned_pos:
        mk.sd["backbone.1.row_embed.weight"] = mk.rand(50, d // 2, low=0.0)
        mk.sd["backbone.1.col_embed.weight"] = mk.rand(50, d // 2, low=0.0)
    mk.sd["input_proj.weight"] = mk.rand(d, a.channels, 1, 1, std=1 / math.sqrt(a.channels))
    mk.sd["input_proj.bias"] = mk.rand(d, std=0.1)
    mk.sd["query_embed.weight"] = mk.rand(a.queries, d)
    mk.linear("class_embed", a.rows, d)
    for i, cout in enumerate((d, d, 4)):
        mk.linear(f"bbox_embed.layers.{i}", cout, d)
    for i in range(a.enc):
        p = f"transformer.encoder.layers.{i}."
        mk.attention(p + "self_attn", d)
        mk.linear(p + "linear1", a.ffn, d)
        mk.linear(p + "linear2", d, a.ffn)
        mk.norm(p + "norm1", d)
        mk.norm(p + "norm2", d)
    if a.pre_norm:
        mk.norm("transformer.encoder.norm", d)
    for i in range(a.dec):
        p = f"transformer.decoder.layers.{i}."
        mk.attention(p + "self_attn", d)
        mk.attention(p + "multihead_attn", d)
        mk.linear(p + "linear1", a.ffn, d)
        mk.linear(p + "linear2", d, a.ffn)
        for k in (1, 2, 3):
            mk.norm(p + f"norm{k}", d)
    mk.norm("transformer.decoder.norm", d)
    if a.pretrain:
        mk.linear("patch2query", d, a.channels)
        if a.feature_align:
            mk.linear("feature_align.layers.0", d, d)
            mk.linear("feature_align.layers.1", a.channels, d)
    return mk.sd


# ----------------------------------------------------------------------------- reference forward
def _frozen_bn(x: Tensor, sd: dict, p: str) -> Tensor:
    scale = sd[p + ".weight"] * (sd[p + ".running_var"] + 1e-5).rsqrt()
    bias = sd[p + ".bias"] - sd[p + ".running_mean"] * scale
    return x * scale[None, :, None, None] + bias[None, :, None, None]


def _resnet_body(x: Tensor, sd: dict, a: Arch) -> Tensor:
    """torchvision ResNet v1.5 (stride on the 3x3 conv) up to layer4; DC5 dilates layer4."""
    b = "backbone.0.body."
    x = F.relu(_frozen_bn(F.conv2d(x, sd[b + "conv1.weight"], stride=2, padding=3), sd, b + "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    dilation = 1
    for stage, n in enumerate(BLOCKS[a.backbone], 1):
        stride, first_dilation = (1 if stage == 1 else 2), dilation
        if a.dilation and stage == 4:
            dilation, stride = dilation * stride, 1
        for i in range(n):
            p = f"{b}layer{stage}.{i}."
            s, dil = (stride, first_dilation) if i == 0 else (1, dilation)
            if a.bottleneck:
                y = F.relu(_frozen_bn(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1"))
                y = F.relu(_frozen_bn(F.conv2d(y, sd[p + "conv2.weight"], stride=s, padding=dil, dilation=dil), sd, p + "bn2"))
                y = _frozen_bn(F.conv2d(y, sd[p + "conv3.weight"]), sd, p + "bn3")
            else:
                y = F.relu(_frozen_bn(F.conv2d(x, sd[p + "conv1.weight"], stride=s, padding=1), sd, p + "bn1"))
                y = _frozen_bn(F.conv2d(y, sd[p + "conv2.weight"], padding=1), sd, p + "bn2")
            shortcut = x
            if p + "downsample.0.weight" in sd:
                shortcut = _frozen_bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=s), sd, p + "downsample.1")
            x = F.relu(y + shortcut)
    return x


def _position(mask: Tensor, sd: dict, a: Arch) -> Tensor:
    """(B, h, w) padding mask -> (B, D, h, w): DETR's normalised sine, or learned row/col."""
    bsz, h, w = mask.shape
    half = a.hidden // 2
    if a.learned_pos:
        cols = sd["backbone.1.col_embed.weight"][:w]  # (w, D/2)
        rows = sd["backbone.1.row_embed.weight"][:h]  # (h, D/2)
        pos = torch.cat([cols.unsqueeze(0).repeat(h, 1, 1), rows.unsqueeze(1).repeat(1, w, 1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(bsz, 1, 1, 1)
    inside = (~mask).float()
    y = inside.cumsum(1)
    x = inside.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    freqs = 10000 ** (2 * (torch.arange(half) // 2).float() / half)  # (D/2,)

    def encode(t):
        t = t[..., None] / freqs  # (B, h, w, D/2)
        return torch.stack([t[..., 0::2].sin(), t[..., 1::2].cos()], dim=4).flatten(3)

    return torch.cat([encode(y), encode(x)], dim=3).permute(0, 3, 1, 2)


def _mha(sd: dict, p: str, q: Tensor, k: Tensor, v: Tensor, heads: int, attn_mask=None, key_padding_mask=None) -> Tensor:
    out, _ = F.multi_head_attention_forward(
        q, k, v, q.shape[-1], heads, sd[p + ".in_proj_weight"], sd[p + ".in_proj_bias"], None, None, False, 0.0,
        sd[p + ".out_proj.weight"], sd[p + ".out_proj.bias"], training=False,
        key_padding_mask=key_padding_mask, need_weights=False, attn_mask=attn_mask,
    )
    return out


def _ln(x: Tensor, sd: dict, p: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)


def _ffn(x: Tensor, sd: dict, p: str) -> Tensor:
    return F.linear(F.relu(F.linear(x, sd[p + "linear1.weight"], sd[p + "linear1.bias"])), sd[p + "linear2.weight"], sd[p + "linear2.bias"])


def _transformer(sd, a: Arch, src, mask, pos, query_pos, tgt_mask=None) -> Tensor:
    """src/pos (S, B, D), mask (B, S), query_pos (Q, B, D) -> hs (L, B, Q, D)."""
    x = src
    for i in range(a.enc):
        p = f"transformer.encoder.layers.{i}."
        if a.pre_norm:
            y = _ln(x, sd, p + "norm1")
            x = x + _mha(sd, p + "self_attn", y + pos, y + pos, y, a.heads, key_padding_mask=mask)
            x = x + _ffn(_ln(x, sd, p + "norm2"), sd, p)
        else:
            x = _ln(x + _mha(sd, p + "self_attn", x + pos, x + pos, x, a.heads, key_padding_mask=mask), sd, p + "norm1")
            x = _ln(x + _ffn(x, sd, p), sd, p + "norm2")
    memory = _ln(x, sd, "transformer.encoder.norm") if a.pre_norm else x
    t = torch.zeros_like(query_pos)
    hs = []
    for i in range(a.dec):
        p = f"transformer.decoder.layers.{i}."
        if a.pre_norm:
            y = _ln(t, sd, p + "norm1")
            t = t + _mha(sd, p + "self_attn", y + query_pos, y + query_pos, y, a.heads, attn_mask=tgt_mask)
            y = _ln(t, sd, p + "norm2")
            t = t + _mha(sd, p + "multihead_attn", y + query_pos, memory + pos, memory, a.heads, key_padding_mask=mask)
            t = t + _ffn(_ln(t, sd, p + "norm3"), sd, p)
        else:
            t = _ln(t + _mha(sd, p + "self_attn", t + query_pos, t + query_pos, t, a.heads, attn_mask=tgt_mask), sd, p + "norm1")
            t = _ln(t + _mha(sd, p + "multihead_attn", t + query_pos, memory + pos, memory, a.heads, key_padding_mask=mask), sd, p + "norm2")
            t = _ln(t + _ffn(t, sd, p), sd, p + "norm3")
        hs.append(_ln(t, sd, "transformer.decoder.norm"))
    return torch.stack(hs).transpose(1, 2)  # (L, Q, B, D) -> (L, B, Q, D)


def _mlp(x: Tensor, sd: dict, p: str, n: int) -> Tensor:
    for i in range(n):
        x = F.linear(x, sd[f"{p}.layers.{i}.weight"], sd[f"{p}.layers.{i}.bias"])
        x = F.relu(x) if i < n - 1 else x
    return x


@torch.no_grad()
def reference_forward(sd: dict, a: Arch, images: Tensor, padding: Tensor | None = None, patches: Tensor | None = None) -> dict:
    """The authors' DETR / UP-DETR forward in eval mode; returns pred_logits, pred_boxes (+ features)."""
    bsz = images.shape[0]
    padding = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool) if padding is None else padding
    feature = _resnet_body(images, sd, a)
    mask = F.interpolate(padding[None].float(), size=feature.shape[-2:])[0].bool()  # (B, h, w)
    pos = _position(mask, sd, a).flatten(2).permute(2, 0, 1)  # (S, B, D)
    src = F.conv2d(feature, sd["input_proj.weight"], sd["input_proj.bias"]).flatten(2).permute(2, 0, 1)  # (S, B, D)
    out = {}
    if patches is None:
        query_pos = sd["query_embed.weight"].unsqueeze(1).repeat(1, bsz, 1)  # (Q, B, D)
        tgt_mask = None
    else:
        k = patches.shape[1]
        group = a.queries // a.patches
        gt = F.adaptive_avg_pool2d(_resnet_body(patches.flatten(0, 1), sd, a), 1).flatten(1)  # (B*k, Cb)
        q = F.linear(gt, sd["patch2query.weight"], sd["patch2query.bias"]).view(bsz, k, -1)  # (B, k, D)
        q = q.repeat_interleave(group, dim=1).permute(1, 0, 2)  # (k*Q/M, B, D)
        query_pos = q + sd["query_embed.weight"][: k * group].unsqueeze(1)
        tgt_mask = torch.full((a.queries, a.queries), float("-inf"))
        for i in range(a.patches):  # the correct loop (the authors' iterates over Q/M)
            tgt_mask[i * group:(i + 1) * group, i * group:(i + 1) * group] = 0
        tgt_mask = tgt_mask[: k * group, : k * group]
        out["gt_feature"] = gt.view(bsz, k, -1)
    hs = _transformer(sd, a, src, mask.flatten(1), pos, query_pos, tgt_mask)
    logits = F.linear(hs, sd["class_embed.weight"], sd["class_embed.bias"])
    boxes = _mlp(hs, sd, "bbox_embed", 3).sigmoid()
    out.update(pred_logits=logits[-1], pred_boxes=boxes[-1], aux_logits=logits[:-1])
    if "feature_align.layers.0.weight" in sd:
        out["pred_feature"] = _mlp(hs, sd, "feature_align", 2)  # (L, B, Q, Cb)
    return out


# ----------------------------------------------------------------------------- helpers
def save_official(tmp_path, a: Arch, name="official.pth", seed=0, args=None, prefix="", **extra):
    sd = published_state_dict(a, seed)
    payload = {"model": {prefix + k: v for k, v in sd.items()}, **extra}
    if args is not None:
        payload["args"] = args
    path = tmp_path / name
    torch.save(payload, path)
    return path, sd


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def check_detector(model, sd, a: Arch, images, padding=None):
    ref = reference_forward(sd, a, images, padding)
    with torch.no_grad():
        out = model(images if padding is None else ImageBatch(images, padding))
    assert out.logits.shape == (images.shape[0], a.queries, a.rows) and out.boxes_cxcywh.shape == (images.shape[0], a.queries, 4)
    close(out.logits, ref["pred_logits"])
    close(out.boxes_cxcywh, ref["pred_boxes"])
    for i, aux in enumerate(out.aux):
        close(aux.logits, ref["aux_logits"][i])
    return out


def check_pretrain(model, sd, a: Arch, images, patches):
    ref = reference_forward(sd, a, images, patches=patches)
    with torch.no_grad():
        out = model(images, patches)
    q = patches.shape[1] * (a.queries // a.patches)
    assert out.logits.shape == (images.shape[0], q, 2)
    close(out.logits, ref["pred_logits"][..., 1:])  # ours: (patch, no object) = the authors' classes 1, 2
    close(out.boxes_cxcywh, ref["pred_boxes"])
    close(out.patch_features, ref["gt_feature"])
    if a.feature_align:
        close(out.features, ref["pred_feature"][-1])
        for i, aux in enumerate(out.aux):
            close(aux.features, ref["pred_feature"][i])
    else:
        assert out.features is None
    return out


# ----------------------------------------------------------------------------- detectors
@pytest.mark.slow
@pytest.mark.parametrize(
    "arch",
    [
        Arch(),  # DETR R50, post-norm, COCO head
        Arch(backbone="resnet18", pre_norm=True),  # UP-DETR fine-tuned detector (pre-norm)
        Arch(backbone="resnet18", pre_norm=True, learned_pos=True, rows=6, enc=1, dec=3),
        Arch(backbone="resnet34", enc=0, dec=1, queries=7, rows=3),
    ],
    ids=["detr-r50", "updetr-prenorm", "r18-learned", "r34-no-encoder"],
)
def test_detector_matches_reference(tmp_path, arch):
    path, sd = save_official(tmp_path, arch)
    model = load_official_checkpoint(path)
    assert isinstance(model, DETR) and not isinstance(model, UPDETR) and not model.training
    assert model.num_classes == arch.rows - 1 and model.transformer.pre_norm == arch.pre_norm
    assert model.backbone.body.name == arch.backbone
    check_detector(model, sd, arch, torch.randn(2, 3, 64, 64))


def test_resnet101_is_recognised(tmp_path):
    arch = Arch(backbone="resnet101", rows=21, pre_norm=True, learned_pos=True)
    torch.save({"model": published_state_dict(arch, values=False)}, tmp_path / "r101.pth")  # shapes only
    m = read_official_checkpoint(tmp_path / "r101.pth").config.model
    assert (m.backbone, m.num_classes, m.pre_norm, m.position_embedding) == ("resnet101", 20, True, "learned")


def test_padded_batch_matches_reference(tmp_path):
    arch = Arch(backbone="resnet18")
    path, sd = save_official(tmp_path, arch)
    model = load_official_checkpoint(path)
    images = torch.randn(2, 3, 96, 64)
    padding = torch.zeros(2, 96, 64, dtype=torch.bool)
    padding[1, 64:, :] = True
    padding[1, :, 32:] = True
    images[1][:, padding[1]] = 0
    check_detector(model, sd, arch, images, padding)


@pytest.mark.slow
def test_full_size_detr_r50(tmp_path):
    """The published DETR-R50 shapes: 6+6 layers, D=256, FFN 2048, 100 queries, 92 logits."""
    arch = Arch(hidden=256, ffn=2048, enc=6, dec=6, queries=100)
    path, sd = save_official(tmp_path, arch)
    ckpt = read_official_checkpoint(path)
    m = ckpt.config.model
    assert (m.backbone, m.hidden_dim, m.ffn_dim, m.enc_layers, m.dec_layers, m.num_queries, m.num_classes) == (
        "resnet50", 256, 2048, 6, 6, 100, 91)
    assert (m.num_heads, m.pre_norm, m.dilation, m.position_embedding) == (8, False, False, "sine")
    check_detector(ckpt.build(), sd, arch, torch.randn(1, 3, 64, 64))


# ----------------------------------------------------------------------------- pre-training
@pytest.mark.slow
@pytest.mark.parametrize("backbone,feature_align", [("resnet50", True), ("resnet18", False)])
def test_pretrain_matches_reference(tmp_path, backbone, feature_align):
    arch = Arch(backbone, pre_norm=True, pretrain=True, feature_align=feature_align, rows=3, queries=12, patches=3)
    path, sd = save_official(tmp_path, arch, args=argparse.Namespace(num_patches=3, nheads=8, pre_norm=True))
    model = load_official_checkpoint(path)
    assert isinstance(model, UPDETR) and not model.training and model.num_patches == 3
    assert (model.feature_align is not None) == feature_align
    images, patches = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 3, 32, 32)
    check_pretrain(model, sd, arch, images, patches)
    check_pretrain(model, sd, arch, images, patches[:, :2])  # k < M: the first k groups


@pytest.mark.slow
def test_pretrain_needs_num_patches_when_args_are_absent(tmp_path):
    arch = Arch("resnet18", pre_norm=True, pretrain=True, feature_align=True, rows=3, queries=12, patches=3)
    path, sd = save_official(tmp_path, arch)
    with pytest.raises(ConfigError, match="num_patches=10 must divide model.num_queries=12.*pass num_patches"):
        load_official_checkpoint(path)  # M defaults to the published 10
    images, patches = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 3, 32, 32)
    check_pretrain(load_official_checkpoint(path, num_patches=3), sd, arch, images, patches)
    other = replace(arch, patches=2)
    check_pretrain(load_official_checkpoint(path, num_patches=2), sd, other, images, patches[:, :2])


# ----------------------------------------------------------------------------- args and overrides
def test_args_namespace_is_read_safely(tmp_path):
    arch = Arch(heads=4, dilation=True)
    args = argparse.Namespace(nheads=4, dilation=True, position_embedding="sine", lr=1e-4, backbone="resnet50",
                              output_dir="out", masks=False, aux_loss=True, dropout=0.1, lr_drop=200)
    path, sd = save_official(tmp_path, arch, args=args, epoch=299)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what a plain safe load says
    ckpt = read_official_checkpoint(path)
    assert ckpt.config.model.num_heads == 4 and ckpt.config.model.dilation
    model = ckpt.build()
    out = check_detector(model, sd, arch, torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 10, 92)


_EXECUTED = []


def _mark_executed():
    _EXECUTED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_mark_executed, ())


def test_pickled_code_is_never_executed(tmp_path):
    path, _ = save_official(tmp_path, Arch(), args=_Payload())
    with pytest.raises(CheckpointError, match="not loaded, for safety: .*carries code or objects that are not plain data"):
        load_official_checkpoint(path)
    assert not _EXECUTED


@pytest.mark.slow
def test_overrides_num_heads_and_dilation(tmp_path):
    arch = Arch(heads=4, dilation=True)
    path, sd = save_official(tmp_path, arch)  # no args: heads and DC5 cannot be seen in the tensors
    images = torch.randn(1, 3, 64, 64)
    default = load_official_checkpoint(path)
    assert default.transformer.nhead == 8
    with torch.no_grad():
        assert not torch.allclose(default(images).logits, reference_forward(sd, arch, images)["pred_logits"], atol=1e-3)
    check_detector(load_official_checkpoint(path, num_heads=4, dilation=True), sd, arch, images)


def test_override_errors(tmp_path):
    path, _ = save_official(tmp_path, Arch("resnet18"))
    with pytest.raises(ConfigError, match="unknown override"):
        load_official_checkpoint(path, heads=4)
    with pytest.raises(ConfigError, match="backbone_weights"):
        load_official_checkpoint(path, backbone_weights="imagenet")
    with pytest.raises(ConfigError, match="not divisible"):
        load_official_checkpoint(path, num_heads=7)
    with pytest.raises(CheckpointError, match="query_embed.weight"):
        load_official_checkpoint(path, num_queries=20)  # contradicts the tensors: strict load names the key
    assert parse_overrides(["num_heads=4", "model.dilation=true", "pretrain.num_patches=5", "backbone=resnet101"]) == {
        "num_heads": 4, "dilation": True, "num_patches": 5, "backbone": "resnet101"}
    with pytest.raises(ConfigError, match="field=value"):
        parse_overrides(["dilation"])


# ----------------------------------------------------------------------------- conversion
@pytest.mark.slow
def test_convert_coco_detector_round_trip(tmp_path):
    arch = Arch("resnet18", pre_norm=True)
    path, sd = save_official(tmp_path, arch, prefix="module.")  # DataParallel-style keys are accepted
    dst = convert_official_checkpoint(path, tmp_path / "ours" / "detr.pth")
    assert dst.is_file() and not list(dst.parent.glob("*.tmp"))
    loaded = load_trained(dst)
    assert loaded.task == "detection" and not loaded.model.training
    assert loaded.config.model.num_classes == 91 and loaded.config.model.pre_norm
    assert len(loaded.classes) == 91 and loaded.category_ids == list(range(91))
    assert loaded.classes[0] == "N/A" and loaded.classes[1] == "person" and loaded.classes[90] == "toothbrush"
    assert loaded.classes[12] == "N/A" and loaded.classes[13] == "stop sign" and loaded.classes[72] == "tv"
    assert sum(c != "N/A" for c in loaded.classes) == 80
    images = torch.randn(1, 3, 64, 64)
    ours = check_detector(loaded.model, sd, arch, images)
    with torch.no_grad():
        direct = load_official_checkpoint(path)(images)
    torch.testing.assert_close(ours.logits, direct.logits, atol=0, rtol=0)


@pytest.mark.slow
def test_convert_other_detector_and_pretrain(tmp_path):
    arch = Arch("resnet18", rows=6, queries=8)
    path, _ = save_official(tmp_path, arch)
    loaded = load_trained(convert_official_checkpoint(path, tmp_path / "six.pth"))
    assert loaded.classes == [f"class_{i}" for i in range(5)] and loaded.category_ids == list(range(5))

    arch = Arch("resnet18", pre_norm=True, pretrain=True, feature_align=True, rows=3, queries=12, patches=3)
    path, sd = save_official(tmp_path, arch, name="pre.pth", args=argparse.Namespace(num_patches=3))
    loaded = load_trained(convert_official_checkpoint(path, tmp_path / "pre_ours.pth"))
    assert loaded.task == "pretrain" and loaded.classes == ["patch"]
    assert loaded.config.pretrain.num_patches == 3 and loaded.config.pretrain.feature_reconstruction
    check_pretrain(loaded.model, sd, arch, torch.randn(1, 3, 64, 64), torch.randn(1, 3, 3, 32, 32))


# ----------------------------------------------------------------------------- errors
def test_truncated_and_missing_files(tmp_path):
    path, _ = save_official(tmp_path, Arch(backbone="resnet18"))
    data = path.read_bytes()
    half = tmp_path / "half.pth"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="half.pth.*truncated or corrupt"):
        load_official_checkpoint(half)
    with pytest.raises(CheckpointError, match="nope.pth: checkpoint file not found"):
        load_official_checkpoint(tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_official_checkpoint(tmp_path / "list.pth")


@pytest.mark.slow
def test_other_architecture_lists_keys(tmp_path):
    sd = published_state_dict(Arch(backbone="resnet18"))
    extra = dict(sd, **{"transformer.level_embed": torch.zeros(4, 64)})
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"(?s)extra.pth.*unexpected: transformer.level_embed"):
        load_official_checkpoint(tmp_path / "extra.pth")
    missing = {k: v for k, v in sd.items() if k != "bbox_embed.layers.2.bias"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"(?s)missing.pth.*missing: bbox_embed.layers.2.bias"):
        load_official_checkpoint(tmp_path / "missing.pth")
    no_queries = {k: v for k, v in sd.items() if k != "query_embed.weight"}
    torch.save({"model": no_queries}, tmp_path / "noq.pth")
    with pytest.raises(CheckpointError, match="not a DETR/UP-DETR state dict"):
        load_official_checkpoint(tmp_path / "noq.pth")
    odd_backbone = {k: v for k, v in sd.items() if ".layer3.1." not in k}
    torch.save({"model": odd_backbone}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"not a torchvision ResNet.*\(2, 2, 1, 2\)"):
        load_official_checkpoint(tmp_path / "odd.pth")


def test_panoptic_checkpoint_is_reported(tmp_path):
    sd = published_state_dict(Arch(backbone="resnet18", rows=251))
    panoptic = {"detr." + k: v for k, v in sd.items()}
    panoptic["bbox_attention.q_linear.weight"] = torch.zeros(64, 64)
    panoptic["mask_head.lay1.weight"] = torch.zeros(8, 72, 3, 3)
    torch.save({"model": panoptic}, tmp_path / "panoptic.pth")
    with pytest.raises(CheckpointError, match="panoptic.*not supported"):
        load_official_checkpoint(tmp_path / "panoptic.pth")


@pytest.mark.slow
def test_convert_keeps_an_updetr_checkpoints_own_config_and_classes(tmp_path):
    """It used to infer the architecture from the tensors: 4 heads became 8, the class names class_i."""
    from updetr.presets import make_config
    from updetr.engine.checkpoint import save_checkpoint
    from updetr.models import build_detr

    cfg = make_config("small", overrides=["model.num_heads=4", "model.hidden_dim=32", "model.ffn_dim=64",
                                          "model.enc_layers=1", "model.dec_layers=2", "model.num_queries=8"])
    torch.manual_seed(0)
    model = build_detr(cfg.model, 3)
    trained = tmp_path / "checkpoint.pth"
    save_checkpoint(trained, {"model": model.state_dict(), "config": cfg.to_dict(), "task": "detection",
                              "classes": ["cat", "dog", "owl"], "category_ids": [3, 7, 9], "epoch": 4,
                              "optimizer": {}, "lr_scheduler": {}})
    converted = load_trained(convert_official_checkpoint(trained, tmp_path / "slim.pth"))
    original = load_trained(trained)
    assert converted.config.model.num_heads == 4 and converted.classes == ["cat", "dog", "owl"]
    assert converted.category_ids == [3, 7, 9] and converted.task == "detection"
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = original.model(images), converted.model(images)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.boxes_cxcywh, b.boxes_cxcywh, rtol=0, atol=0)
    assert "optimizer" not in torch.load(tmp_path / "slim.pth", weights_only=True)
