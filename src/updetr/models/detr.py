"""DETR: backbone + transformer + set-prediction heads (Carion et al., 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..structures import DetectionOutput, ImageBatch
from .backbone import Joiner, build_backbone
from .transformer import Transformer


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's box head; UP-DETR's feature head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@dataclass
class HiddenState:
    """Intermediate results of one forward pass, for heads built on top of DETR."""

    hs: Tensor  # (L, B, Q, D) decoder outputs of every layer
    memory: Tensor  # (B, h*w, D) encoder output
    features: list[tuple[Tensor, Tensor]]  # backbone [(B, Cb_i, h_i, w_i), padding mask (B, h_i, w_i)]
    pos: Tensor  # (B, D, h, w) positional encoding of the last feature map
    padding_mask: Tensor  # (B, h, w) True = padding, last feature map


class DETR(nn.Module):
    """The DETR detector.

    ``forward`` returns a :class:`DetectionOutput` in train and eval mode alike; losses
    live in :mod:`updetr.losses`, post-processing in :mod:`updetr.evaluation`.

    Args:
        backbone: a :class:`Joiner` (ResNet + positional encoding).
        transformer: the encoder-decoder.
        num_classes: C; the class head predicts C + 1 logits (last = no object).
        num_queries: Q learned object queries.
        aux_loss: also return the predictions of the decoder layers before the last.
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int, aux_loss: bool = True):
        super().__init__()
        d = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.input_proj = nn.Conv2d(backbone.body.num_channels, d, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)

    def forward_hidden(
        self,
        images: ImageBatch | Tensor,
        query_extra: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        query_indices: Tensor | None = None,
    ) -> HiddenState:
        """Backbone, encoder and decoder.

        Args:
            images: an :class:`ImageBatch`, or a (B, 3, H, W) tensor of unpadded images.
            query_extra: optional (B, Q', D) or (Q', D) embedding added to the learned
                object queries (UP-DETR adds the query-patch features here).
            self_attn_mask: optional (Q', Q') decoder self-attention mask (see ``Transformer``).
            query_indices: optional (Q',) long indices selecting/permuting the learned
                queries (default: all Q in order).
        """
        if isinstance(images, Tensor):
            b, _, h, w = images.shape
            images = ImageBatch(images, torch.zeros((b, h, w), dtype=torch.bool, device=images.device))
        features, pos = self.backbone(images)
        src, mask = features[-1]
        query_pos = self.query_embed.weight  # (Q, D)
        if query_indices is not None:
            query_pos = query_pos[query_indices]  # (Q', D)
        query_pos = query_pos.unsqueeze(0).expand(src.shape[0], -1, -1)  # (B, Q', D)
        if query_extra is not None:
            query_pos = query_pos + query_extra
        hs, memory = self.transformer(self.input_proj(src), mask, pos[-1], query_pos, self_attn_mask)
        return HiddenState(hs=hs, memory=memory, features=features, pos=pos[-1], padding_mask=mask)

    def predict_heads(self, hs: Tensor) -> DetectionOutput:
        """Class and box heads on every decoder layer: hs (L, B, Q, D) -> output (last layer + aux)."""
        logits = self.class_embed(hs)  # (L, B, Q, C+1)
        boxes = self.bbox_embed(hs).sigmoid()  # (L, B, Q, 4)
        aux = [DetectionOutput(logits[i], boxes[i]) for i in range(hs.shape[0] - 1)] if self.aux_loss else []
        return DetectionOutput(logits=logits[-1], boxes_cxcywh=boxes[-1], aux=aux)

    def forward(self, images: ImageBatch | Tensor, **kwargs) -> DetectionOutput:
        """Detect objects. ``images``: ImageBatch or (B, 3, H, W) normalised pixels."""
        return self.predict_heads(self.forward_hidden(images, **kwargs).hs)


def build_detr(cfg: ModelConfig, num_classes: int, *, train_backbone: bool = True, return_interm_layers: bool = False) -> DETR:
    """Build DETR from a :class:`ModelConfig`; ``train_backbone`` False freezes the whole CNN."""
    backbone = build_backbone(
        cfg.backbone,
        hidden_dim=cfg.hidden_dim,
        position_embedding=cfg.position_embedding,
        trainable=train_backbone,
        dilation=cfg.dilation,
        weights=cfg.backbone_weights,
        return_interm_layers=return_interm_layers,
        last_stage=cfg.backbone_stage,
    )
    backbone.body.unpadded = cfg.backbone_unpadded
    transformer = Transformer(
        d_model=cfg.hidden_dim,
        nhead=cfg.num_heads,
        num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers,
        dim_feedforward=cfg.ffn_dim,
        dropout=cfg.dropout,
        pre_norm=cfg.pre_norm,
    )
    return DETR(backbone, transformer, num_classes=num_classes, num_queries=cfg.num_queries, aux_loss=cfg.aux_loss)
