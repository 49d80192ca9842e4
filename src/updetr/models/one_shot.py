"""One-shot detection model: DETR conditioned on one query patch (paper §3.2; docs/method.md §3).

A thin subclass of :class:`DETR`, like :class:`~updetr.models.updetr.UPDETR` with a
single patch and no groups: the query patch (an exemplar crop of the target class) goes
through the detector's own CNN, global average pooling and ``patch2query``, and the result
is added to *all* Q object queries (the author in up-detr#24: "each query patch will add
to all object queries"). The class head is binary, ``class_embed = Linear(D, 2)``: index 0
"matches the query patch", index 1 "no object"; boxes come from DETR's box head.

Initialisation (``init_one_shot_from_checkpoint``):

- an UP-DETR pre-training checkpoint: everything but ``class_embed`` and ``feature_align``,
  so ``patch2query`` keeps what the pretext task taught it;
- a DETR / UP-DETR *detection* checkpoint: everything but ``class_embed``;
  ``patch2query`` starts fresh (the DETR baseline of Table 3);
- a one-shot checkpoint: everything (continue training);
- nothing (``build_one_shot`` only): from scratch, apart from ``model.backbone_weights``.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ..config import ModelConfig
from ..serialization import init_from_checkpoint, load_checkpoint
from ..structures import DetectionOutput, FeatureBatch, ImageBatch
from .backbone import Joiner
from .detr import DETR, build_detr
from .transformer import Transformer

__all__ = ["OneShotDETR", "build_one_shot", "init_one_shot_from_checkpoint", "checkpoint_kind"]

MATCH_LABEL = 0  # class index of "matches the query patch"; index 1 is no-object


class OneShotDETR(DETR):
    """DETR whose object queries all carry the feature of one query patch.

    Args:
        backbone, transformer: as :class:`DETR` (the CNN encodes the image and the patch).
        num_queries: Q object queries, all conditioned on the same patch.
        aux_loss: also return the predictions of the earlier decoder layers.
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_queries: int, *, aux_loss: bool = True):
        super().__init__(backbone, transformer, num_classes=1, num_queries=num_queries, aux_loss=aux_loss)
        self.patch2query = nn.Linear(backbone.body.num_channels, transformer.d_model)

    def encode_query_patches(self, query_patches: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, h, w) normalised patches -> (pooled CNN features (B, Cb), query embedding (B, D))."""
        patch_features = self.backbone.body.pooled_features(query_patches)  # (B, Cb)
        return patch_features, self.patch2query(patch_features)  # (B, Cb), (B, D)

    def forward(self, images: ImageBatch | FeatureBatch | Tensor, query_patches: Tensor) -> DetectionOutput:
        """Find every object of the query patch's class in each image.

        Args:
            images: ImageBatch, (B, 3, H, W) normalised pixels, or a FeatureBatch of cached CNN features.
            query_patches: (B, 3, h, w) or (B, 1, 3, h, w) normalised query patches, one per
                image (ImageNet mean/std, any h, w; the data pipeline resizes to a square).

        Returns:
            DetectionOutput with ``logits`` (B, Q, 2) (index 0 = match, 1 = no object),
            ``boxes_cxcywh`` (B, Q, 4), ``aux`` and ``patch_features`` (B, 1, Cb).
        """
        if query_patches.dim() == 5:
            if query_patches.shape[1] != 1:
                raise ValueError(f"one-shot detection takes one query patch per image, got {query_patches.shape[1]}")
            query_patches = query_patches[:, 0]  # (B, 3, h, w)
        if query_patches.dim() != 4 or query_patches.shape[1] != 3:
            raise ValueError(f"query_patches must be (B, 3, h, w), got {tuple(query_patches.shape)}")
        if isinstance(images, ImageBatch):
            batch = images.pixels.shape[0]
        elif isinstance(images, FeatureBatch):
            batch = images.features.shape[0]
        else:
            batch = images.shape[0]
        if query_patches.shape[0] != batch:
            raise ValueError(f"{query_patches.shape[0]} query patches for {batch} images (one per image)")
        patch_features, query_embedding = self.encode_query_patches(query_patches)  # (B, Cb), (B, D)
        query_extra = query_embedding.unsqueeze(1)  # (B, 1, D), broadcast over all Q queries
        hidden = self.forward_hidden(images, query_extra=query_extra)
        out = self.predict_heads(hidden.hs)
        out.patch_features = patch_features.unsqueeze(1)  # (B, 1, Cb)
        return out


def build_one_shot(model_cfg: ModelConfig, *, train_backbone: bool) -> OneShotDETR:
    """A fresh one-shot detector; ``train_backbone`` False freezes the whole CNN (image and patch)."""
    detr = build_detr(model_cfg, num_classes=1, train_backbone=train_backbone)
    return OneShotDETR(detr.backbone, detr.transformer, num_queries=model_cfg.num_queries, aux_loss=model_cfg.aux_loss)


def checkpoint_kind(ckpt: dict) -> str:
    """``oneshot`` | ``updetr-pretrain`` (has ``patch2query``) | ``detection`` (DETR or fine-tuned UP-DETR)."""
    if ckpt.get("task") == "oneshot":
        return "oneshot"
    if any(k.removeprefix("module.").startswith("patch2query.") for k in ckpt["model"]):
        return "updetr-pretrain"
    return "detection"


_DROP = {
    "oneshot": (),
    "updetr-pretrain": ("class_embed.", "feature_align."),
    "detection": ("class_embed.", "patch2query.", "feature_align."),
}


def init_one_shot_from_checkpoint(model: OneShotDETR, path: str | Path) -> dict[str, list[str] | str]:
    """Initialise ``model`` from a pre-training, detection or one-shot checkpoint (see module docstring).

    Strict apart from the dropped heads: any other missing, extra or mis-shaped key is a
    :class:`~updetr.serialization.CheckpointError` listing them. Returns
    ``{"kind", "loaded", "dropped", "kept_fresh"}``.
    """
    ckpt = load_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    report = init_from_checkpoint(model, path, drop_prefixes=_DROP[kind], checkpoint=ckpt)
    return {"kind": kind, **report}
