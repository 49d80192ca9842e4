"""The detection task: DETR trained and evaluated on a COCO- or VOC-format dataset."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import Config
from ..data.build import build_detection_dataset
from ..data.collate import collate_detection
from ..data.feature_cache import cache_train_val, collate_features
from ..data.io import DataError
from ..evaluation.coco_eval import CocoEvaluator
from ..evaluation.postprocess import postprocess_detections
from ..losses.criterion import build_criterion
from ..models import build_detr
from ..structures import DetectionOutput
from .checkpoint import TASK_SPECIFIC_PREFIXES, CheckpointError, init_from_checkpoint, load_checkpoint

log = logging.getLogger(__name__)


def targets_to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


class DetectionTask:
    """DETR on labelled boxes. The dataset tells the model its classes."""

    name = "detection"
    primary_metric = "AP"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.class_agnostic = False  # evaluate with every class counted as one (``updetr eval --class-agnostic``)
        self._train: Dataset | None = None
        self._val: Dataset | None = None
        self.classes: list[str] = []
        self.category_ids: list[int] = []

    def train_dataset(self) -> Dataset:
        if self._train is None:
            # cached CNN features are computed once per image, at the eval size
            self._train = build_detection_dataset(self.cfg.data, "train", augment=not self.cfg.data.cache_features)
            self.classes, self.category_ids = list(self._train.classes), list(self._train.category_ids)
        return self._train

    def val_dataset(self) -> Dataset | None:
        if self._val is None:
            self._val = self.eval_dataset("val")
        return self._val

    def eval_dataset(self, split: str) -> Dataset:
        dataset = build_detection_dataset(self.cfg.data, split, augment=False)  # the eval resize for either split
        if self.classes and list(dataset.classes) != self.classes:
            raise DataError(f"{getattr(dataset, 'source', split)}: classes {list(dataset.classes)} differ from the "
                            f"model's {self.classes}")  # fmt: skip
        if not self.classes:
            self.classes, self.category_ids = list(dataset.classes), list(dataset.category_ids)
        return dataset

    def collate(self, batch: list) -> Any:
        if self.cfg.data.cache_features:
            return collate_features(batch)
        return collate_detection(batch, self.cfg.data.size_divisibility)

    def cache_features(self, model: nn.Module, device: torch.device, progress: bool = True) -> tuple[Dataset, Dataset | None]:
        """Wrap the datasets in :class:`CachedDetection` (the frozen CNN run once per image)."""
        data = self.cfg.data
        return cache_train_val(self.train_dataset(), self.val_dataset(), model, device, hflip=data.hflip,
                               seed=self.cfg.seed, num_workers=data.num_workers, progress=progress,
                               store_dir=data.feature_cache_dir, engine=data.feature_engine)

    @property
    def num_classes(self) -> int:
        n = self.cfg.model.num_classes
        if n is not None and self.classes and n != len(self.classes):
            raise ValueError(f"model.num_classes={n} but the dataset has {len(self.classes)} classes")
        return n if n is not None else len(self.classes)

    def build_architecture(self) -> nn.Module:
        return build_detr(self.cfg.model, self.num_classes, train_backbone=self.cfg.optim.lr_backbone > 0)

    def build_model(self) -> nn.Module:
        model = self.build_architecture()
        if self.cfg.init_from:
            drop = TASK_SPECIFIC_PREFIXES
            ckpt = load_checkpoint(self.cfg.init_from)
            ckpt_classes = ckpt.get("classes")
            if ckpt_classes is not None and list(ckpt_classes) == self.classes:
                drop = tuple(p for p in drop if p != "class_embed.")  # same label set: keep the class head
            report = init_from_checkpoint(model, self.cfg.init_from, drop_prefixes=drop, checkpoint=ckpt)
            log.info(
                "initialised from %s: %d tensors loaded, dropped %s, fresh %s",
                self.cfg.init_from, len(report["loaded"]), report["dropped"] or "none", report["kept_fresh"] or "none",
            )
        return model

    def build_criterion(self) -> nn.Module:
        return build_criterion(self.cfg.loss, self.num_classes)

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[DetectionOutput, list[dict]]:
        images, targets = batch
        return model(images.to(device)), targets_to_device(targets, device)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, progress: bool = True) -> dict[str, float]:
        return evaluate_detection(model, loader, device, progress=progress, class_agnostic=self.class_agnostic)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"classes": self.classes, "category_ids": self.category_ids}

    def restore(self, ckpt: dict[str, Any], source: str) -> None:
        self.classes = list(ckpt.get("classes") or [])
        if not self.classes:
            if not self.cfg.model.num_classes:
                raise CheckpointError(f"{source}: stores neither model.num_classes nor the class names")
            self.classes = [f"class_{i}" for i in range(self.cfg.model.num_classes)]
        self.category_ids = list(ckpt.get("category_ids") or range(1, len(self.classes) + 1))


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader: DataLoader, device: torch.device, *, progress: bool = True,
                       class_agnostic: bool = False) -> dict[str, float]:
    """COCO box AP (percent) of ``model`` on ``loader``'s dataset, at original image sizes.

    ``class_agnostic``: every class counts as one (see ``CocoEvaluator``).
    """
    model.eval()
    dataset = loader.dataset
    evaluator = CocoEvaluator(dataset.coco, list(dataset.category_ids), class_agnostic=class_agnostic)
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        output = model(images.to(device))
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections = postprocess_detections(output, orig_sizes)
        evaluator.update([int(t["image_id"]) for t in targets], [{k: v.cpu() for k, v in d.items()} for d in detections])
    evaluator.synchronize()
    return evaluator.summarize()
