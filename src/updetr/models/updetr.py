"""UP-DETR pre-training model: random query patch detection (paper §3.1).

A thin subclass of :class:`DETR`. Each of the M query patches is encoded by the same
CNN plus global average pooling, projected to the transformer width
(``patch2query``) and added to its own contiguous group of Q/M object queries. The
decoder self-attention is restricted to within a group (paper Eq. 3), and an optional
MLP (``feature_align``) reconstructs the patch's CNN feature from each decoder output
(paper Eq. 2). Module names match the published checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig, PretrainConfig
from ..structures import DetectionOutput, ImageBatch
from .backbone import Joiner
from .detr import DETR, MLP, build_detr
from .transformer import Transformer


def group_attention_mask(num_queries: int, num_patches: int, device: torch.device | None = None) -> Tensor:
    """Block-diagonal decoder self-attention mask of paper Eq. 3.

    Query i belongs to group ``i // (num_queries // num_patches)``; a query may attend
    only to queries of its own group. Returns bool (Q, Q) with True = blocked (the
    ``attn_mask`` convention of ``nn.MultiheadAttention``). Unlike the authors' loop,
    correct for every M dividing Q (never a fully blocked row).
    """
    if num_patches <= 0 or num_queries % num_patches:
        raise ValueError(f"num_patches={num_patches} must divide num_queries={num_queries}")
    group = torch.arange(num_queries, device=device) // (num_queries // num_patches)  # (Q,)
    return group[:, None] != group[None, :]  # (Q, Q)


class UPDETR(DETR):
    """DETR conditioned on M query patches; class head = {patch, no object}.

    Args:
        num_patches: M; Q must be divisible by M.
        feature_reconstruction: add ``feature_align`` and return reconstructed features.
        attention_mask: use the group mask in decoder self-attention.
        patch_drop_ratio: in training, each (image, query) drops its patch feature with
            this probability (the authors' code uses 0.1, "similar to dropout").
        query_shuffle: in training, permute the learned object queries every batch.
    """

    def __init__(
        self,
        backbone: Joiner,
        transformer: Transformer,
        num_queries: int,
        num_patches: int,
        *,
        aux_loss: bool = True,
        feature_reconstruction: bool = True,
        attention_mask: bool = True,
        patch_drop_ratio: float = 0.1,
        query_shuffle: bool = False,
    ):
        super().__init__(backbone, transformer, num_classes=1, num_queries=num_queries, aux_loss=aux_loss)
        if num_queries % num_patches:
            raise ValueError(f"num_patches={num_patches} must divide num_queries={num_queries}")
        channels = backbone.body.num_channels
        self.num_patches = num_patches
        self.patch2query = nn.Linear(channels, transformer.d_model)
        self.feature_align = MLP(transformer.d_model, transformer.d_model, channels, 2) if feature_reconstruction else None
        self.attention_mask = attention_mask
        self.patch_drop_ratio = patch_drop_ratio
        self.query_shuffle = query_shuffle

    @property
    def queries_per_patch(self) -> int:
        return self.num_queries // self.num_patches

    def forward(self, images: ImageBatch | Tensor, query_patches: Tensor) -> DetectionOutput:
        """Find each query patch in its image.

        Args:
            images: ImageBatch or (B, 3, H, W) normalised pixels.
            query_patches: (B, k, 3, h, w) normalised patches; k = M in training, any
                k ≤ M at inference (the first k query groups are used).

        Returns:
            DetectionOutput with Q' = k·Q/M queries: ``logits`` (B, Q', 2), ``boxes_cxcywh``,
            ``patch_features`` (B, k, Cb) and, with reconstruction, ``features`` (B, Q', Cb).
        """
        b, k = query_patches.shape[:2]
        if k > self.num_patches or (self.training and k != self.num_patches):
            raise ValueError(
                f"got {k} query patches per image; the model has M={self.num_patches} "
                f"({'exactly M in training' if self.training else 'at most M at inference'})"
            )
        patch_features = self.backbone.body.pooled_features(query_patches.flatten(0, 1))  # (B*k, Cb)
        patch_features = patch_features.view(b, k, -1)  # (B, k, Cb)
        query_extra = self.patch2query(patch_features)  # (B, k, D)
        query_extra = query_extra.repeat_interleave(self.queries_per_patch, dim=1)  # (B, Q', D), contiguous groups
        num_q = query_extra.shape[1]
        query_indices = None
        if self.training:
            if self.patch_drop_ratio > 0:
                keep = torch.rand(b, num_q, 1, device=query_extra.device) >= self.patch_drop_ratio  # (B, Q', 1)
                query_extra = query_extra * keep
            if self.query_shuffle:
                query_indices = torch.randperm(self.num_queries, device=query_extra.device)  # (Q,)
        elif num_q < self.num_queries:
            query_indices = torch.arange(num_q, device=query_extra.device)  # first k groups
        attn_mask = group_attention_mask(num_q, k, query_extra.device) if self.attention_mask else None
        hidden = self.forward_hidden(images, query_extra=query_extra, self_attn_mask=attn_mask, query_indices=query_indices)
        out = self.predict_heads(hidden.hs)
        out.patch_features = patch_features
        if self.feature_align is not None:
            features = self.feature_align(hidden.hs)  # (L, B, Q', Cb)
            out.features = features[-1]
            for i, aux in enumerate(out.aux):
                aux.features = features[i]
        return out


def build_updetr(model_cfg: ModelConfig, pretrain_cfg: PretrainConfig) -> UPDETR:
    """UP-DETR for pre-training; the CNN is frozen when ``pretrain_cfg.freeze_backbone``."""
    detr = build_detr(model_cfg, num_classes=1, train_backbone=not pretrain_cfg.freeze_backbone)
    return UPDETR(
        detr.backbone,
        detr.transformer,
        num_queries=model_cfg.num_queries,
        num_patches=pretrain_cfg.num_patches,
        aux_loss=model_cfg.aux_loss,
        feature_reconstruction=pretrain_cfg.feature_reconstruction,
        attention_mask=pretrain_cfg.attention_mask,
        patch_drop_ratio=pretrain_cfg.patch_drop_ratio,
        query_shuffle=pretrain_cfg.query_shuffle,
    )
