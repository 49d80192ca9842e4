"""DETR's panoptic mask head (Carion et al., 2020, §4.4) on top of a (UP-)DETR detector.

:class:`DETRsegm` wraps a :class:`~updetr.models.detr.DETR` built with
``return_interm_layers=True`` and adds, for the decoder output of the last layer:

1. :class:`MHAttentionMap`: multi-head attention *maps* between every query and the
   encoder memory, (B, Q, nh, h, w) at stride 32. The softmax runs over the pixels of each
   head separately (``flatten(3)``), the fix of facebookresearch/detr#247 that the UP-DETR
   authors applied (docs/method.md §4); DETR as first published normalised jointly over heads
   and pixels (``flatten(2)``), available as ``per_head_softmax=False``.
2. :class:`MaskHeadSmallConv`: an FPN-style convolutional head. The projected last
   backbone feature map, concatenated with each query's attention maps, goes through
   conv + GroupNorm + ReLU blocks and is upsampled three times, adding the (1x1-adapted)
   backbone layers 3, 2 and 1 — ending at stride 4 with one logit per pixel.

``DETRsegm.forward`` returns a :class:`~updetr.structures.DetectionOutput` whose
``masks`` are (B, Q, H/4, W/4) mask logits (sigmoid = mask probability) on the padded
batch grid; the padding region carries no meaning.

State-dict keys are DETR's: ``detr.*`` (the detector), ``bbox_attention.{q_linear,
k_linear}.*`` and ``mask_head.{lay1..lay5, gn1..gn5, out_lay, adapter1..3}.*`` (docs/method.md §5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..structures import DetectionOutput, ImageBatch
from .detr import DETR

__all__ = ["DETRsegm", "MHAttentionMap", "MaskHeadSmallConv", "build_detr_segm"]


def _group_norm(channels: int) -> nn.GroupNorm:
    """DETR's GroupNorm(8, C); fewer groups when C is not a multiple of 8 (tiny test models only)."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _repeat_per_query(x: Tensor, num_queries: int) -> Tensor:
    """(B, C, h, w) -> (B*Q, C, h, w), image b's map repeated for each of its Q queries."""
    return x.unsqueeze(1).expand(-1, num_queries, -1, -1, -1).flatten(0, 1)  # (B*Q, C, h, w)


class MHAttentionMap(nn.Module):
    """Attention weights (no values) of each query over the encoder memory, per head.

    Args:
        query_dim: D of the decoder output and of the memory.
        hidden_dim: width of the query/key projections (split over ``num_heads``).
        num_heads: nh.
        dropout: on the attention weights.
        per_head_softmax: softmax over the h*w pixels of each head (the #247 fix, UP-DETR);
            False normalises over heads and pixels together (DETR as first published).
    """

    def __init__(
        self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0, per_head_softmax: bool = True
    ) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.per_head_softmax = per_head_softmax
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        for layer in (self.q_linear, self.k_linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.scale = float(hidden_dim // num_heads) ** -0.5

    def forward(self, queries: Tensor, memory: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """queries (B, Q, D), memory (B, D, h, w), padding_mask (B, h, w) True = padding
        -> attention weights (B, Q, nh, h, w); each head's map sums to 1 over the pixels
        (``per_head_softmax``), padded pixels get weight 0."""
        b, q, _ = queries.shape
        _, _, h, w = memory.shape
        head_dim = self.hidden_dim // self.num_heads
        qh = self.q_linear(queries).view(b, q, self.num_heads, head_dim)  # (B, Q, nh, hd)
        k = F.conv2d(memory, self.k_linear.weight[:, :, None, None], self.k_linear.bias)  # (B, hidden, h, w)
        kh = k.view(b, self.num_heads, head_dim, h, w)  # (B, nh, hd, h, w)
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.scale, kh)  # (B, Q, nh, h, w)
        if padding_mask is not None:
            weights = weights.masked_fill(padding_mask[:, None, None], float("-inf"))
        start_dim = 3 if self.per_head_softmax else 2
        weights = weights.flatten(start_dim).softmax(-1).view(b, q, self.num_heads, h, w)  # (B, Q, nh, h, w)
        return self.dropout(weights)


class MaskHeadSmallConv(nn.Module):
    """DETR's FPN-style mask head: stride 32 -> 16 -> 8 -> 4, one logit per pixel and query.

    Args:
        in_channels: channels of the input, D + nh (projected feature map + attention maps).
        fpn_channels: channels of backbone layers 3, 2, 1 (R50: 1024, 512, 256).
        context_dim: D; the inner widths are D/2, D/4, D/8, D/16 (DETR's formula).
    """

    def __init__(self, in_channels: int, fpn_channels: list[int], context_dim: int) -> None:
        super().__init__()
        if context_dim < 16:
            raise ValueError(f"the mask head needs a hidden dimension >= 16, got {context_dim}")
        if len(fpn_channels) != 3:
            raise ValueError(f"fpn_channels must list backbone layers 3, 2, 1; got {fpn_channels}")
        dims = [in_channels, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = nn.Conv2d(dims[0], dims[0], 3, padding=1)
        self.gn1 = _group_norm(dims[0])
        self.lay2 = nn.Conv2d(dims[0], dims[1], 3, padding=1)
        self.gn2 = _group_norm(dims[1])
        self.lay3 = nn.Conv2d(dims[1], dims[2], 3, padding=1)
        self.gn3 = _group_norm(dims[2])
        self.lay4 = nn.Conv2d(dims[2], dims[3], 3, padding=1)
        self.gn4 = _group_norm(dims[3])
        self.lay5 = nn.Conv2d(dims[3], dims[4], 3, padding=1)
        self.gn5 = _group_norm(dims[4])
        self.out_lay = nn.Conv2d(dims[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_channels[0], dims[1], 1)
        self.adapter2 = nn.Conv2d(fpn_channels[1], dims[2], 1)
        self.adapter3 = nn.Conv2d(fpn_channels[2], dims[3], 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _add_fpn(x: Tensor, fpn: Tensor, adapter: nn.Conv2d) -> Tensor:
        """x (B*Q, C, h, w) upsampled (nearest) onto adapter(fpn) (B, C, 2h, 2w) and added."""
        lateral = adapter(fpn)  # (B, C, h', w')
        lateral = _repeat_per_query(lateral, x.shape[0] // lateral.shape[0])  # (B*Q, C, h', w')
        return lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")

    def forward(self, features: Tensor, attention: Tensor, fpns: list[Tensor]) -> Tensor:
        """features (B, D, h, w), attention (B, Q, nh, h, w), fpns [layer3, layer2, layer1]
        -> mask logits (B*Q, 1, H/4, W/4)."""
        num_queries = attention.shape[1]
        x = torch.cat([_repeat_per_query(features, num_queries), attention.flatten(0, 1)], dim=1)  # (B*Q, D+nh, h, w)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        x = self._add_fpn(x, fpns[0], self.adapter1)  # stride 16
        x = F.relu(self.gn3(self.lay3(x)))
        x = self._add_fpn(x, fpns[1], self.adapter2)  # stride 8
        x = F.relu(self.gn4(self.lay4(x)))
        x = self._add_fpn(x, fpns[2], self.adapter3)  # stride 4
        x = F.relu(self.gn5(self.lay5(x)))
        return self.out_lay(x)  # (B*Q, 1, H/4, W/4)


class DETRsegm(nn.Module):
    """A DETR detector plus DETR's mask head.

    Args:
        detr: a DETR whose backbone returns layers 1–4 (``build_detr(...,
            return_interm_layers=True)``).
        freeze_detr: the detector is fixed (stage 2 of the paper's recipe): its parameters
            get ``requires_grad=False``, it runs without autograd and stays in eval mode
            (no dropout) even when the wrapper is in train mode; only ``bbox_attention``
            and ``mask_head`` train.
        per_head_softmax: see :class:`MHAttentionMap`.
    """

    def __init__(self, detr: DETR, *, freeze_detr: bool = False, per_head_softmax: bool = True) -> None:
        super().__init__()
        channels = detr.backbone.body.channels
        if len(channels) != 4:
            raise ValueError("DETRsegm needs backbone layers 1-4: build the DETR with return_interm_layers=True")
        self.detr = detr
        self.freeze_detr = freeze_detr
        if freeze_detr:
            for p in self.detr.parameters():
                p.requires_grad_(False)
        d = detr.transformer.d_model
        num_heads = detr.transformer.nhead
        self.bbox_attention = MHAttentionMap(d, d, num_heads, dropout=0.0, per_head_softmax=per_head_softmax)
        self.mask_head = MaskHeadSmallConv(d + num_heads, [channels[2], channels[1], channels[0]], d)

    @property
    def num_classes(self) -> int:
        return self.detr.num_classes

    @property
    def num_queries(self) -> int:
        return self.detr.num_queries

    def train(self, mode: bool = True) -> "DETRsegm":
        super().train(mode)
        if self.freeze_detr:
            self.detr.eval()
        return self

    def forward(self, images: ImageBatch | Tensor) -> DetectionOutput:
        """Detections of every decoder layer plus the last layer's mask logits (B, Q, H/4, W/4)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_detr):
            state = self.detr.forward_hidden(images)
            output = self.detr.predict_heads(state.hs)
            src, _ = state.features[-1]
            features = self.detr.input_proj(src)  # (B, D, h, w)
        b, d, h, w = features.shape
        memory = state.memory.transpose(1, 2).reshape(b, d, h, w)  # (B, h*w, D) -> (B, D, h, w)
        attention = self.bbox_attention(state.hs[-1], memory, state.padding_mask)  # (B, Q, nh, h, w)
        fpns = [state.features[2][0], state.features[1][0], state.features[0][0]]  # layers 3, 2, 1
        masks = self.mask_head(features, attention, fpns)  # (B*Q, 1, H/4, W/4)
        output.masks = masks.view(b, attention.shape[1], masks.shape[-2], masks.shape[-1])  # (B, Q, H/4, W/4)
        return output


def build_detr_segm(detr: DETR, *, freeze_detr: bool = False) -> DETRsegm:
    """Wrap ``detr`` (built with ``return_interm_layers=True``) with the mask head."""
    return DETRsegm(detr, freeze_detr=freeze_detr)
