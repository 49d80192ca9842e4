"""Positional encodings of the backbone feature map (DETR §A.4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine encoding, normalised to [0, 2π] over the unpadded image.

    Output (B, D, h, w) with D = 2 * ``num_pos_feats``: the first half encodes y, the
    second x, each as interleaved (sin, cos) pairs, exactly as DETR.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi

    def forward(self, padding_mask: Tensor) -> Tensor:
        """``padding_mask``: bool (B, h, w), True = padding. Returns (B, D, h, w)."""
        not_mask = (~padding_mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)  # (B, h, w), 1-based row index inside the image
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=padding_mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t  # (B, h, w, D/2)
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, D, h, w)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute row/column embeddings (up to 50 × 50 feature cells), as DETR."""

    def __init__(self, num_pos_feats: int = 128, max_cells: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_cells, num_pos_feats)
        self.col_embed = nn.Embedding(max_cells, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, padding_mask: Tensor) -> Tensor:
        b, h, w = padding_mask.shape
        if h > self.row_embed.num_embeddings or w > self.col_embed.num_embeddings:
            raise ValueError(
                f"learned position embedding covers at most {self.row_embed.num_embeddings} feature cells "
                f"per side, got a {h}x{w} feature map; use model.position_embedding=sine for large images"
            )
        x_emb = self.col_embed(torch.arange(w, device=padding_mask.device))  # (w, D/2)
        y_emb = self.row_embed(torch.arange(h, device=padding_mask.device))  # (h, D/2)
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(b, -1, -1, -1)  # (B, D, h, w)


def build_position_encoding(kind: str, hidden_dim: int) -> nn.Module:
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"unknown position embedding {kind!r}; choose sine or learned")
