"""The panoptic task: DETR's two-stage recipe (docs/method.md §4) on a COCO panoptic dataset.

- stage ``1``: the detector (plain DETR) trained on the boxes of every segment, things and
  stuff as classes (C = things + stuff); evaluated with box AP.
- stage ``2``: the stage-1 detector frozen (``cfg.init_from`` is required), DETR's mask
  head trained with focal + dice losses; evaluated with PQ / SQ / RQ and segmentation AP.
- ``joint``: detector and mask head trained together from any starting point.

Starting points (``cfg.init_from``): nothing (scratch), an UP-DETR pre-training
checkpoint, a detection checkpoint, or a panoptic one. Detector weights go into
``model.detr`` whatever the source's key layout (``backbone.*`` or ``detr.backbone.*``), and
the transfer is strict: a checkpoint that fits nothing is an error, not a silent no-op (the
authors' ``--masks --pretrain`` loaded nothing, docs/method.md §7.4).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import Config, ConfigError, DataConfig, PanopticConfig
from ..data.coco_panoptic import CocoPanoptic
from ..data.collate import collate_detection
from ..data.feature_cache import cache_train_val, collate_features
from ..data.io import DataError
from ..data.transforms import build_transforms
from ..evaluation.panoptic import PanopticQualityEvaluator, SegmentationAPEvaluator
from ..evaluation.panoptic_postprocess import instance_predictions, postprocess_panoptic
from ..losses.criterion import build_criterion
from ..losses.segmentation import SegmentationCriterion
from ..models import DETR, build_detr
from ..models.segmentation import DETRsegm
from ..structures import DetectionOutput
from .checkpoint import (
    TASK_SPECIFIC_PREFIXES,
    CheckpointError,
    init_from_checkpoint,
    load_checkpoint,
)
from .detection import evaluate_detection, targets_to_device

log = logging.getLogger(__name__)

__all__ = [
    "PanopticTask", "build_panoptic_dataset", "build_panoptic_model", "evaluate_panoptic", "initialise_panoptic_model",
    "panoptic_paths", "run_panoptic_evaluation",
]


def panoptic_paths(data: DataConfig, options: PanopticConfig, split: str) -> tuple[Path, Path, Path]:
    """(images folder, panoptic JSON, PNG folder) of ``split``, relative paths resolved against ``data.root``.

    Defaults follow both the official layout (``train2017`` -> ``annotations/panoptic_train2017.json`` +
    ``annotations/panoptic_train2017/``) and the embedded benchmark's (``train`` -> ``annotations/panoptic_train.json``).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} must be 'train' or 'val'")
    root = Path(data.root) if data.root else None

    def resolve(path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() or root is None else root / p

    images = data.train_images if split == "train" else data.val_images
    annotations = options.train_annotations if split == "train" else options.val_annotations
    segmentations = options.train_segmentations if split == "train" else options.val_segmentations
    if not annotations:
        annotations = f"annotations/panoptic_{Path(images).name}.json"
    if not segmentations:
        segmentations = str(Path(annotations).with_suffix(""))
    return resolve(images), resolve(annotations), resolve(segmentations)


def build_panoptic_dataset(cfg: Config, split: str, *, return_masks: bool, augment: bool | None = None) -> CocoPanoptic:
    """The ``train`` (augmenting transforms unless ``augment=False``) or ``val`` (eval resize) panoptic dataset
    of ``cfg.data`` with the files of ``cfg.panoptic``."""
    if cfg.data.root and not Path(cfg.data.root).is_dir():
        raise DataError(f"data.root={cfg.data.root!r}: folder not found")
    images, annotations, segmentations = panoptic_paths(cfg.data, cfg.panoptic, split)
    transforms = build_transforms(cfg.data, train=split == "train" if augment is None else augment)
    return CocoPanoptic(images, annotations, segmentations, transforms, return_masks=return_masks)


class PanopticTask:
    """The Task of :func:`updetr.engine.loop.fit` for panoptic segmentation (see the module doc)."""

    name = "panoptic"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.primary_metric = "AP" if self.cfg.panoptic.stage == "1" else "PQ"
        self._train: CocoPanoptic | None = None
        self._val: CocoPanoptic | None = None
        self.classes: list[str] = []
        self.category_ids: list[int] = []
        self.categories: list[dict[str, Any]] = []

    @property
    def with_masks(self) -> bool:
        return self.cfg.panoptic.stage != "1"

    def _adopt(self, dataset: CocoPanoptic) -> None:
        if self.classes and list(dataset.classes) != self.classes:
            raise DataError(
                f"{dataset.annotation_file}: classes {list(dataset.classes)} differ from the training set's {self.classes}"
            )
        if not self.classes:
            self.classes, self.category_ids = list(dataset.classes), list(dataset.category_ids)
            self.categories = [{k: c[k] for k in ("id", "name", "isthing", "color") if k in c} for c in dataset.categories]

    def train_dataset(self) -> Dataset:
        if self._train is None:
            # with cached CNN features (stage 1) the images take the eval transform; flips come from the cache
            self._train = build_panoptic_dataset(self.cfg, "train", return_masks=self.with_masks,
                                                 augment=not self.cfg.data.cache_features)
            self._adopt(self._train)
        return self._train

    def val_dataset(self) -> Dataset | None:
        if self._val is None:
            self._val = self.eval_dataset("val")
        return self._val

    def eval_dataset(self, split: str) -> CocoPanoptic:
        """A split at the eval resize, without masks: PQ compares with the PNG segments at the original size."""
        dataset = build_panoptic_dataset(self.cfg, split, return_masks=False, augment=False)
        self._adopt(dataset)
        return dataset

    def collate(self, batch: list) -> Any:
        if self.cfg.data.cache_features:
            return collate_features(batch)
        return collate_detection(batch, self.cfg.data.size_divisibility)

    def cache_features(self, model: nn.Module, device: torch.device, progress: bool = True) -> tuple[Dataset, Dataset]:
        """Stage 1 only (a DETR on the segments' boxes): the frozen CNN run once per image and its mirror."""
        if self.with_masks:
            raise ConfigError(f"data.cache_features: panoptic stage {self.cfg.panoptic.stage} feeds the CNN's intermediate "
                              "layers to the mask head, which are not cached; use it for stage 1 only")
        data = self.cfg.data
        return cache_train_val(self.train_dataset(), self.val_dataset(), model, device, hflip=data.hflip,
                               seed=self.cfg.seed, num_workers=data.num_workers, progress=progress,
                               store_dir=data.feature_cache_dir, engine=data.feature_engine)

    @property
    def num_classes(self) -> int:
        n = self.cfg.model.num_classes
        if n is not None and self.classes and n != len(self.classes):
            raise ConfigError(
                f"model.num_classes={n} but the panoptic dataset has {len(self.classes)} classes (things + stuff)"
            )
        return n if n is not None else len(self.classes)

    @property
    def isthing(self) -> list[bool]:
        return [bool(c["isthing"]) for c in self.categories]

    def build_architecture(self) -> nn.Module:
        return build_panoptic_model(self.cfg, self.num_classes, self.cfg.panoptic.stage)

    def build_model(self) -> nn.Module:
        stage = self.cfg.panoptic.stage
        if stage == "2" and not self.cfg.init_from:
            raise ConfigError(
                "panoptic stage 2 freezes the detector: pass the stage-1 checkpoint as init_from (--init-from)"
            )
        model = self.build_architecture()
        if self.cfg.init_from:
            initialise_panoptic_model(model, self.cfg.init_from, self.classes, require_class_head=stage == "2")
        return model

    def restore(self, ckpt: dict[str, Any], source: str) -> None:
        self.classes = list(ckpt.get("classes") or [])
        self.categories = list(ckpt.get("categories") or [])
        if not self.classes or len(self.categories) != len(self.classes):
            raise CheckpointError(f"{source}: lacks its class list or categories")
        self.category_ids = list(ckpt.get("category_ids") or [c["id"] for c in self.categories])

    def build_criterion(self) -> nn.Module:
        criterion = build_criterion(self.cfg.loss, self.num_classes)
        if not self.with_masks:
            return criterion
        return SegmentationCriterion(criterion, loss_mask=self.cfg.panoptic.loss_mask, loss_dice=self.cfg.panoptic.loss_dice)

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[DetectionOutput, list[dict]]:
        images, targets = batch
        return model(images.to(device)), targets_to_device(targets, device)

    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device, progress: bool = True
    ) -> dict[str, float]:
        if not self.with_masks:
            return evaluate_detection(model, loader, device, progress=progress)
        return evaluate_panoptic(
            model, loader, device, threshold=self.cfg.panoptic.threshold, min_area=self.cfg.panoptic.min_area, progress=progress
        )

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"classes": self.classes, "category_ids": self.category_ids, "categories": self.categories}


def build_panoptic_model(cfg: Config, num_classes: int, stage: str) -> nn.Module:
    """Stage 1: DETR; stage 2: DETRsegm with a frozen detector; joint: DETRsegm, all trainable
    (backbone layers 2–4 when ``optim.lr_backbone > 0``)."""
    if stage == "1":
        return build_detr(cfg.model, num_classes, train_backbone=cfg.optim.lr_backbone > 0)
    train_backbone = stage == "joint" and cfg.optim.lr_backbone > 0
    detr = build_detr(cfg.model, num_classes, train_backbone=train_backbone, return_interm_layers=True)
    return DETRsegm(detr, freeze_detr=stage == "2")


class _Prefixed(nn.Module):
    """Holds a DETR as ``.detr`` so that its state-dict keys read ``detr.*``."""

    def __init__(self, detr: DETR):
        super().__init__()
        self.detr = detr


def initialise_panoptic_model(
    model: nn.Module, path: str | Path, classes: list[str], *, require_class_head: bool = False
) -> dict[str, list[str]]:
    """Load a checkpoint's detector (and mask head, when both have one) into ``model``.

    ``model`` is a DETR (stage 1) or a DETRsegm. The source may be DETR-layout (pre-training,
    detection or stage-1 checkpoints: ``backbone.*``, ``transformer.*``, ...) or
    DETRsegm-layout (``detr.*`` + ``bbox_attention.*`` + ``mask_head.*``); the prefix is
    matched to the model so every detector tensor really loads (strictly, via
    :func:`init_from_checkpoint`). The class head is kept only when the checkpoint was
    trained on the same ``classes``; ``require_class_head`` makes a different label set an
    error (stage 2 cannot train a frozen class head).

    Returns :func:`init_from_checkpoint`'s report; ``loaded`` and ``kept_fresh`` name
    ``model``'s keys, ``dropped`` the checkpoint's.
    """
    ckpt = load_checkpoint(path)
    state = ckpt["model"]
    source_segm = any(k.startswith(("detr.", "module.detr.")) for k in state)
    same_classes = ckpt.get("task") != "pretrain" and list(ckpt.get("classes") or []) == list(classes)
    if require_class_head and not same_classes:
        raise CheckpointError(
            f"{path}: the detector is frozen in stage 2, so its checkpoint must be trained on these classes "
            f"({len(classes)}: {classes[:5]}...), e.g. the stage-1 run; it holds task {ckpt.get('task')!r} "
            f"with classes {list(ckpt.get('classes') or [])[:5]}"
        )
    head = () if same_classes else ("class_embed.",)
    detector_drop = tuple(p for p in TASK_SPECIFIC_PREFIXES if p != "class_embed.") + head
    if isinstance(model, DETRsegm) and source_segm:
        target: nn.Module = model
        drop = tuple("detr." + p for p in detector_drop)
    elif isinstance(model, DETRsegm):
        target = model.detr
        drop = detector_drop
    elif source_segm:  # a DETRsegm checkpoint into a plain DETR: its mask head is left behind
        target = _Prefixed(model)
        drop = tuple("detr." + p for p in detector_drop) + ("bbox_attention.", "mask_head.")
    else:
        target = model
        drop = detector_drop
    report = init_from_checkpoint(target, path, drop_prefixes=drop, checkpoint=ckpt)
    if target is not model:  # name the model's own keys in the report
        rename = (lambda k: "detr." + k) if isinstance(model, DETRsegm) else (lambda k: k.removeprefix("detr."))
        report["loaded"] = [rename(k) for k in report["loaded"]]
        report["kept_fresh"] = [rename(k) for k in report["kept_fresh"]]
        if isinstance(model, DETRsegm):  # a detector-only source: the mask head starts fresh
            report["kept_fresh"] += [k for k in model.state_dict() if not k.startswith("detr.")]
    if not report["loaded"]:
        raise CheckpointError(f"{path}: no tensor of the checkpoint fits the model")
    log.info(
        "initialised from %s (%s layout): %d tensors loaded, dropped %s, fresh %s",
        path, "DETRsegm" if source_segm else "DETR", len(report["loaded"]),
        _summary(report["dropped"]), _summary(report["kept_fresh"]),
    )
    return report


def _summary(keys: list[str]) -> str:
    if not keys:
        return "none"
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    return f"{len(keys)} tensors ({', '.join(prefixes[:6])})"


def evaluate_panoptic(
    model: nn.Module, loader: DataLoader, device: torch.device, *, threshold: float = 0.85, min_area: int = 5,
    progress: bool = True,
) -> dict[str, float]:
    """PQ / SQ / RQ (all, ``th``, ``st``) and ``AP_seg``, ``AP50_seg``, ``AP75_seg`` (things),
    percent, on ``loader``'s :class:`CocoPanoptic` dataset at the original image sizes."""
    pq, ap = run_panoptic_evaluation(model, loader, device, threshold=threshold, min_area=min_area, progress=progress)
    return {**pq.summarize(), **ap.summarize()}


@torch.no_grad()
def run_panoptic_evaluation(
    model: nn.Module, loader: DataLoader, device: torch.device, *, threshold: float = 0.85, min_area: int = 5,
    progress: bool = True,
) -> tuple[PanopticQualityEvaluator, SegmentationAPEvaluator]:
    """Post-process every image of ``loader`` and feed the evaluators (synchronised across ranks)."""
    model.eval()
    dataset: CocoPanoptic = loader.dataset
    pq = PanopticQualityEvaluator(dataset.categories)
    ap = SegmentationAPEvaluator(dataset.categories, dataset.category_ids)
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        output = model(images.to(device))
        sizes = torch.stack([t["size"] for t in targets])
        origs = torch.stack([t["orig_size"] for t in targets])
        padded = tuple(images.pixels.shape[-2:])
        panoptic = postprocess_panoptic(
            output, sizes, origs, isthing=dataset.isthing, category_ids=dataset.category_ids,
            threshold=threshold, min_area=min_area, padded_size=padded,
        )
        instances = instance_predictions(output, sizes, origs, padded_size=padded)
        for target, segmentation, detections in zip(targets, panoptic, instances):
            image_id = int(target["image_id"])
            gt = dataset.ground_truth(dataset.index_of(image_id))
            pq.update(image_id, gt.segment_ids, gt.segments, segmentation.segment_ids, segmentation.segments_info)
            ap.update(image_id, gt.segment_ids, gt.segments, detections)
    pq.synchronize()
    ap.synchronize()
    return pq, ap
