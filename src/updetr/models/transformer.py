"""DETR's encoder-decoder transformer, post-norm or pre-norm.

State-dict names follow DETR (``encoder.layers.i.self_attn``, ``linear1``, ``norm1`` …,
``decoder.layers.i.multihead_attn``, ``decoder.norm``) so published checkpoints load.
All tensors here are batch-first: sequences are (B, S, D).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        """``src``/``pos`` (B, S, D); ``key_padding_mask`` bool (B, S), True = padding."""
        if self.pre_norm:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=key_padding_mask, need_weights=False)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = k = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False)[0]))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        self_attn_mask: Tensor | None,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
    ) -> Tensor:
        """``tgt``/``query_pos`` (B, Q, D); ``memory``/``pos`` (B, S, D); masks as in ``Transformer``."""
        if self.pre_norm:
            x = self.norm1(tgt)
            q = k = _with_pos(x, query_pos)
            tgt = tgt + self.dropout1(self.self_attn(q, k, x, attn_mask=self_attn_mask, need_weights=False)[0])
            x = self.norm2(tgt)
            attn = self.multihead_attn(
                _with_pos(x, query_pos), _with_pos(memory, pos), memory,
                key_padding_mask=memory_key_padding_mask, need_weights=False,
            )[0]
            tgt = tgt + self.dropout2(attn)
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]))
        attn = self.multihead_attn(
            _with_pos(tgt, query_pos), _with_pos(memory, pos), memory,
            key_padding_mask=memory_key_padding_mask, need_weights=False,
        )[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int, norm: nn.LayerNorm | None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm  # only for pre-norm: a final LayerNorm (absent from post-norm checkpoints)

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return self.norm(src) if self.norm is not None else src


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, norm: nn.LayerNorm):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, **kwargs) -> Tensor:
        """Returns every layer's normalised output stacked: (L, B, Q, D)."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, **kwargs)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over the object queries.

    The decoder input (``tgt``) starts at zero; the object queries enter as
    ``query_pos``, added to queries and keys of every decoder attention (DETR).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
    ):
        super().__init__()
        enc = EncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.encoder = Encoder(enc, num_encoder_layers, nn.LayerNorm(d_model) if pre_norm else None)
        dec = DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.decoder = Decoder(dec, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self.nhead = nhead
        self.pre_norm = pre_norm
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: Tensor,
        padding_mask: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run encoder and decoder.

        Args:
            src: (B, D, h, w) projected backbone features.
            padding_mask: bool (B, h, w), True = padding.
            pos: (B, D, h, w) positional encoding.
            query_pos: (B, Q, D) object-query embeddings (learned queries plus any extra
                per-query embedding, e.g. UP-DETR's patch features).
            self_attn_mask: optional decoder self-attention mask (Q, Q), bool with True =
                "may not attend", or float added to the attention logits (-inf blocks).

        Returns:
            hidden states of every decoder layer (L, B, Q, D) and the memory (B, h*w, D).
        """
        src = src.flatten(2).transpose(1, 2)  # (B, h*w, D)
        pos = pos.flatten(2).transpose(1, 2)  # (B, h*w, D)
        mask = padding_mask.flatten(1)  # (B, h*w)
        if not mask.any():
            mask = None  # no padding: skip the masking work entirely
        memory = self.encoder(src, mask, pos)
        tgt = torch.zeros_like(query_pos)
        hs = self.decoder(
            tgt, memory, self_attn_mask=self_attn_mask, memory_key_padding_mask=mask, pos=pos, query_pos=query_pos
        )
        return hs, memory
