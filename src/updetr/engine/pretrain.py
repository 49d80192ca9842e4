"""The UP-DETR pre-training task: random query patch detection on unlabelled images."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.ops import box_iou

from ..box_ops import cxcywh_to_xyxy
from ..config import Config
from ..data.collate import collate_with_patches
from ..data.feature_cache import CachedPretrainImages, collate_features_with_patches, pretrain_feature_table
from ..data.unlabeled import UnlabeledImages
from ..losses.criterion import build_criterion
from ..models import build_updetr
from ..structures import DetectionOutput
from .detection import targets_to_device
from .distributed import all_reduce_mean

log = logging.getLogger(__name__)

EVAL_IMAGES = 64  # images of the folder on which the pretext hit rate is measured


def images_folder(cfg: Config) -> Path:
    """``data.images`` resolved against ``data.root``."""
    if not cfg.data.images:
        raise ValueError("pre-training needs an image folder: pass --images DIR (or data.images=DIR)")
    path = Path(cfg.data.images)
    if not path.is_absolute() and cfg.data.root:
        path = Path(cfg.data.root) / path
    return path


class PretrainTask:
    """UP-DETR pretext: find where each of M random crops of an image came from."""

    name = "pretrain"
    primary_metric = "hit_rate"

    def __init__(self, cfg: Config):
        cfg.check_query_groups()
        self.cfg = cfg
        self._train: UnlabeledImages | None = None

    def _dataset(self, augment: bool, seed: int) -> UnlabeledImages:
        cfg = self.cfg
        return UnlabeledImages(
            images_folder(cfg),
            num_patches=cfg.pretrain.num_patches,
            query_size=cfg.pretrain.query_size,
            min_patch_size=cfg.pretrain.min_patch_size,
            max_patch_size=cfg.pretrain.max_patch_size,
            scales=cfg.data.scales,
            max_size=cfg.data.max_size,
            seed=seed,
            augment=augment,
        )

    def train_dataset(self) -> Dataset:
        if self._train is None:
            self._train = self._dataset(augment=True, seed=self.cfg.seed)
        return self._train

    def val_dataset(self) -> Subset:
        return self.eval_dataset("val")

    def eval_dataset(self, split: str) -> Subset:
        """A fixed subset of the folder, un-augmented patches, fixed crops (seed + 1); the folder has no splits."""
        if split != "val":
            raise ValueError(f"split={split!r}: pre-training measures its pretext on a fixed subset of its folder ('val')")
        full = self._dataset(augment=False, seed=self.cfg.seed + 1)
        return Subset(full, list(range(min(EVAL_IMAGES, len(full)))))

    def collate(self, batch: list) -> Any:
        if self.cfg.data.cache_features:
            return collate_features_with_patches(batch)
        return collate_with_patches(batch, self.cfg.data.size_divisibility)

    def cache_features(self, model: nn.Module, device: torch.device, progress: bool = True) -> tuple[Dataset, Dataset]:
        """Image features from the frozen CNN once per file (eval size); patches are drawn as always."""
        train = self.train_dataset()
        table = pretrain_feature_table(train, model, device, self.cfg.data.val_size, progress=progress,
                                       store_dir=self.cfg.data.feature_cache_dir,
                                       engine=self.cfg.data.feature_engine)
        val = self.val_dataset()  # the same files: the table serves its images too
        return CachedPretrainImages(train, table), Subset(CachedPretrainImages(val.dataset, table), val.indices)

    @property
    def eos_coef(self) -> float:
        """No-object weight: the config's, or M/Q as the paper states (λ = M/N)."""
        if self.cfg.loss.eos_coef is not None:
            return self.cfg.loss.eos_coef
        return self.cfg.pretrain.num_patches / self.cfg.model.num_queries

    def build_architecture(self) -> nn.Module:
        return build_updetr(self.cfg.model, self.cfg.pretrain)

    def build_model(self) -> nn.Module:
        if self.cfg.init_from:
            raise ValueError("init_from is for fine-tuning; to continue a pre-training run use --resume")
        return self.build_architecture()

    def build_criterion(self) -> nn.Module:
        p = self.cfg.pretrain
        group = self.cfg.model.num_queries // p.num_patches if p.group_matching else None
        loss_cfg = self.cfg.loss
        if not p.feature_reconstruction:
            loss_cfg = replace(loss_cfg, loss_feature=0.0)
        return build_criterion(loss_cfg, num_classes=1, group_size=group, eos_coef_override=self.eos_coef)

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[DetectionOutput, list[dict]]:
        images, targets, patches = batch
        output = model(images.to(device), patches.to(device))
        return output, targets_to_device(targets, device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, progress: bool = True) -> dict[str, float]:
        return evaluate_pretext(model, loader, device)

    classes = ["patch"]  # the one class of the pretext: "this query found its patch"
    category_ids = [1]

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"classes": self.classes, "category_ids": self.category_ids}

    def restore(self, ckpt: dict[str, Any], source: str) -> None:
        """Nothing to read back: the pretext has one class and no split."""


def pretext_ious(out: DetectionOutput, targets: list[dict], num_patches: int) -> list[torch.Tensor]:
    """Per image, the (M,) IoU between each patch's box and the box of its group's most confident query."""
    b, k = len(targets), num_patches
    scores = out.logits.softmax(-1)[..., 0].view(b, k, -1)  # (B, M, Q/M) "patch" probability
    best = scores.argmax(-1)  # (B, M)
    boxes = out.boxes_cxcywh.view(b, k, -1, 4)  # (B, M, Q/M, 4)
    chosen = boxes.gather(2, best[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)  # (B, M, 4)
    return [box_iou(cxcywh_to_xyxy(chosen[i]), cxcywh_to_xyxy(t["boxes_cxcywh"].to(chosen.device))).diagonal()
            for i, t in enumerate(targets)]


@torch.no_grad()
def evaluate_pretext(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Hit rate at IoU 0.5: for each patch, the most confident query of its group finds its box."""
    model.eval()
    hits, total, iou_sum = 0, 0, 0.0
    for images, targets, patches in loader:
        out = model(images.to(device), patches.to(device))
        for ious in pretext_ious(out, targets, patches.shape[1]):
            hits += int((ious >= 0.5).sum())
            iou_sum += float(ious.sum())
            total += len(ious)
    stats = {"hit_rate": 100.0 * hits / max(total, 1), "mean_iou": iou_sum / max(total, 1)}
    return all_reduce_mean(stats, device)
