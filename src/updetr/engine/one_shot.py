"""One-shot detection: the training task and its evaluation.

Python entry points (the ``updetr experiment`` report calls these):

- :func:`train_one_shot` ``(cfg, options) -> FitResult``: train from ``cfg.init_from`` (an
  UP-DETR pre-training checkpoint, a DETR / UP-DETR detection checkpoint) or from scratch;
  checkpoints land in ``cfg.output_dir`` (``checkpoint.pth``, ``best.pth`` by seen AP50).
- :func:`evaluate_one_shot` ``(checkpoint) -> dict``: the CoAE protocol (5 query draws
  per (test image, class), AP50 per class, means over seen and unseen classes).

Prediction with drawing is :func:`updetr.one_shot_predict.predict_one_shot`; the ``updetr oneshot``
command line is :mod:`updetr.cli_oneshot`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..box_ops import normalized_cxcywh_to_xyxy_px
from ..config import Config, ConfigError, DataConfig
from ..data.build import build_detection_dataset
from ..data.collate import collate_with_patches
from ..data.feature_cache import cache_train_val, collate_features_with_patches
from ..data.io import DataError
from ..data.one_shot import (
    CachedOneShot, OneShotEpisodes, OneShotSplit, OneShotTrainDataset, collate_one_shot, load_oneshot_split,
)  # fmt: skip
from ..evaluation.one_shot import AP_METHODS, OneShotEvaluator, OneShotResult
from ..losses.criterion import build_criterion
from ..models.one_shot import MATCH_LABEL, OneShotDETR, build_one_shot, init_one_shot_from_checkpoint
from ..structures import DetectionOutput
from .checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict
from .detection import targets_to_device
from .distributed import DistInfo, resolve_device
from .loop import FitResult, fit, make_loader

log = logging.getLogger(__name__)


@dataclass
class OneShotOptions:
    """One-shot settings (proposed as ``Config.oneshot``; until then passed alongside the config)."""

    split: str = ""  # "" = data.root/oneshot_split.json, else the paper's split for VOC | voc | JSON file | "unseen=a,b"
    num_draws: int = 5  # query patches per (test image, class); AP50 is averaged over the draws
    min_exemplar_size: int = 8  # smallest exemplar box side, pixels of the original image
    freeze_backbone: bool | None = None  # None: the CNN trains iff optim.lr_backbone > 0
    exclude_unseen_images: bool = False  # also skip training images showing any unseen object
    ap_method: str = "voc07"  # voc07 (11-point, CoAE on VOC2007) | voc (all-point area)

    def validate(self) -> "OneShotOptions":
        if self.num_draws <= 0 or self.min_exemplar_size <= 0:
            raise ConfigError(f"oneshot.num_draws={self.num_draws} and min_exemplar_size={self.min_exemplar_size} must be > 0")
        if self.ap_method not in AP_METHODS:
            raise ConfigError(f"oneshot.ap_method={self.ap_method!r} is not one of {', '.join(AP_METHODS)}")
        return self


def options_from_config(cfg: Config) -> OneShotOptions:
    """``cfg.oneshot`` when the config has that section, else the defaults."""
    section = getattr(cfg, "oneshot", None)
    if section is None:
        return OneShotOptions()
    names = {f.name for f in dataclasses.fields(OneShotOptions)}
    return OneShotOptions(**{k: v for k, v in asdict(section).items() if k in names}).validate()


class OneShotTask:
    """One-shot detection for :func:`~updetr.engine.loop.fit` (see ``updetr.data.one_shot`` for the data)."""

    name = "oneshot"
    primary_metric = "AP50_seen"  # picks best.pth; unseen classes must not steer model selection

    def __init__(self, cfg: Config, options: OneShotOptions | None = None):
        self.cfg = cfg
        self.options = (options or options_from_config(cfg)).validate()
        self.split: OneShotSplit | None = None
        self.classes: list[str] = []
        self.category_ids: list[int] = []
        self.init_kind = "scratch"
        self._train: OneShotTrainDataset | None = None
        self._val: OneShotEpisodes | None = None

    def _adopt(self, dataset) -> OneShotSplit:
        if self.classes and list(dataset.classes) != self.classes:
            raise DataError(f"train and val datasets disagree on classes: {self.classes} vs {list(dataset.classes)}")
        self.classes, self.category_ids = list(dataset.classes), list(dataset.category_ids)
        if self.split is None:
            d = self.cfg.data
            self.split = load_oneshot_split(self.options.split, self.classes, data_root=d.root, data_format=d.format)
        return self.split

    def train_dataset(self) -> OneShotTrainDataset:
        if self._train is None:
            # with cached CNN features the images take the eval transform (flips come from the cache)
            base = build_detection_dataset(self.cfg.data, "train", augment=not self.cfg.data.cache_features)
            self._train = OneShotTrainDataset(
                base, self._adopt(base), query_size=self.cfg.pretrain.query_size,
                min_exemplar_size=self.options.min_exemplar_size, seed=self.cfg.seed,
                exclude_unseen_images=self.options.exclude_unseen_images,
            )  # fmt: skip
        return self._train

    def val_dataset(self) -> OneShotEpisodes:
        if self._val is None:
            base = build_detection_dataset(self.cfg.data, "val")
            seen, unseen = self._adopt(base).labels(self.classes)
            self._val = OneShotEpisodes(
                base, seen + unseen, query_size=self.cfg.pretrain.query_size,
                min_exemplar_size=self.options.min_exemplar_size, num_draws=self.options.num_draws,
            )  # fmt: skip
        return self._val

    def collate(self, batch: list) -> Any:
        if self.cfg.data.cache_features:
            return collate_features_with_patches(batch)
        return collate_with_patches(batch, self.cfg.data.size_divisibility)

    def cache_features(self, model: nn.Module, device: torch.device, progress: bool = True) -> tuple[Dataset, Dataset]:
        """The frozen CNN run once per training image (and its mirror) and per test image; the pairs,
        episodes and query patches stay those of the uncached datasets."""
        data = self.cfg.data
        train, val = self.train_dataset(), self.val_dataset()
        train_features, val_features = cache_train_val(train.dataset, val.dataset, model, device, hflip=data.hflip,
                                                       seed=self.cfg.seed, num_workers=data.num_workers,
                                                       progress=progress, store_dir=data.feature_cache_dir,
                                                       engine=data.feature_engine)
        return CachedOneShot(train, train_features), CachedOneShot(val, val_features)

    def build_model(self) -> nn.Module:
        freeze = self.options.freeze_backbone
        train_backbone = self.cfg.optim.lr_backbone > 0 if freeze is None else not freeze
        model = build_one_shot(self.cfg.model, train_backbone=train_backbone)
        if self.cfg.init_from:
            report = init_one_shot_from_checkpoint(model, self.cfg.init_from)
            self.init_kind = str(report["kind"])
            log.info("initialised from %s (%s): %d tensors loaded, dropped %s, fresh %s", self.cfg.init_from,
                     report["kind"], len(report["loaded"]), report["dropped"] or "none", report["kept_fresh"] or "none")  # fmt: skip
        return model

    def build_criterion(self) -> nn.Module:
        eos = self.cfg.loss.eos_coef if self.cfg.loss.eos_coef is not None else 0.1
        return build_criterion(self.cfg.loss, num_classes=1, eos_coef_override=eos)

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[DetectionOutput, list[dict]]:
        images, targets, patches = batch
        return model(images.to(device), patches.to(device)), targets_to_device(targets, device)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, progress: bool = True) -> dict[str, float]:
        seen, unseen = self.split.labels(self.classes)
        result = run_one_shot_evaluation(model, loader, device, seen, unseen, method=self.options.ap_method, progress=progress)
        return result.metrics()

    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            "classes": self.classes, "category_ids": self.category_ids,
            "oneshot": {"split": self.split.to_dict() if self.split else None, "options": asdict(self.options),
                        "init": self.init_kind, "init_from": self.cfg.init_from},
        }  # fmt: skip


@torch.no_grad()
def run_one_shot_evaluation(
    model: nn.Module, loader: DataLoader, device: torch.device, seen_labels: list[int], unseen_labels: list[int],
    *, method: str = "voc07", progress: bool = True,
) -> OneShotResult:
    """Run ``model`` on every episode of ``loader.dataset`` (an :class:`OneShotEpisodes`), once per draw."""
    model.eval()
    episodes: OneShotEpisodes = getattr(loader.dataset, "source", loader.dataset)  # CachedOneShot wraps it
    ground_truth: dict[int, dict[int, Any]] = {}
    for e, (index, label) in enumerate(episodes.episodes):
        ground_truth.setdefault(label, {})[int(episodes.dataset.image_ids[index])] = episodes.ground_truth(e)
    evaluator = OneShotEvaluator(episodes.dataset.classes, seen_labels, unseen_labels, ground_truth, episodes.num_draws, method)
    for images, targets, patches in tqdm(loader, desc="one-shot eval", disable=not progress, leave=False, dynamic_ncols=True):
        images = images.to(device)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)  # (B, 2)
        for draw in range(patches.shape[1]):
            output = model(images, patches[:, draw].to(device))  # patches: (B, K, 3, q, q)
            scores = output.logits.float().softmax(-1)[..., MATCH_LABEL]  # (B, Q)
            boxes = normalized_cxcywh_to_xyxy_px(output.boxes.float(), orig_sizes)  # (B, Q, 4)
            for t, s, b in zip(targets, scores, boxes):
                evaluator.update(int(t["query_label"]), draw, int(t["image_id"]), s, b)
    evaluator.synchronize()
    return evaluator.summarize()


def train_one_shot(
    cfg: Config, options: OneShotOptions | None = None, *, resume: str | None = None, progress: bool = True,
    dist_info: DistInfo | None = None,
) -> FitResult:
    """Train one-shot detection with ``cfg`` (``cfg.init_from``: pre-training / detection checkpoint or "")."""
    dist_info = dist_info or DistInfo(device=resolve_device(cfg.device))
    return fit(OneShotTask(cfg, options), cfg, dist_info, resume=resume, progress=progress)


@dataclass
class LoadedOneShot:
    model: OneShotDETR
    config: Config
    split: OneShotSplit
    options: OneShotOptions
    classes: list[str]
    init: str  # how the trained model was initialised: updetr-pretrain | detection | oneshot | scratch


def load_one_shot_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedOneShot:
    """Rebuild a one-shot model from its checkpoint (strict load, eval mode)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("task") != "oneshot" or "config" not in ckpt:
        raise CheckpointError(f"{path}: is a {ckpt.get('task', 'bare')!r} checkpoint, not one from `updetr oneshot train` "
                              f"(to start one-shot training from it: updetr oneshot train --init-from {path})")  # fmt: skip
    try:
        cfg = Config.from_dict(ckpt["config"], str(path))
    except ConfigError as err:
        raise CheckpointError(f"{path}: stored config is invalid: {err}") from None
    cfg.model.backbone_weights = "none"  # the weights come from the checkpoint
    meta = ckpt.get("oneshot") or {}
    names = {f.name for f in dataclasses.fields(OneShotOptions)}
    options = OneShotOptions(**{k: v for k, v in (meta.get("options") or {}).items() if k in names})
    if not meta.get("split"):
        raise CheckpointError(f"{path}: stores no one-shot split")
    model = build_one_shot(cfg.model, train_backbone=False)
    load_state_dict_strict(model, ckpt["model"], str(path))
    model.to(device).eval()
    split = OneShotSplit(tuple(meta["split"]["seen"]), tuple(meta["split"]["unseen"]))
    return LoadedOneShot(model, cfg, split, options, list(ckpt.get("classes") or []), str(meta.get("init", "scratch")))


def evaluate_one_shot_result(
    checkpoint: str | Path, *, data: DataConfig | None = None, data_split: str = "val", split: str | None = None,
    classes: list[str] | None = None, num_draws: int | None = None, ap_method: str | None = None,
    device: str | torch.device = "auto", batch_size: int | None = None, num_workers: int = 0, progress: bool = False,
) -> OneShotResult:
    """:func:`evaluate_one_shot` returning the :class:`OneShotResult`."""
    device = resolve_device(device) if isinstance(device, str) else device
    loaded = load_one_shot_model(checkpoint, device)
    data = data or loaded.config.data
    dataset = build_detection_dataset(data, data_split)
    one_shot = loaded.split if split is None else load_oneshot_split(split, dataset.classes, data_root=data.root, data_format=data.format)
    seen, unseen = one_shot.labels(list(dataset.classes), getattr(dataset, "source", data_split))
    if classes:
        unknown = [c for c in classes if c not in dataset.classes or dataset.classes.index(c) not in seen + unseen]
        if unknown:
            raise DataError(f"--classes {', '.join(map(repr, unknown))}: not a seen or unseen class of the split "
                            f"(seen: {', '.join(one_shot.seen)}; unseen: {', '.join(one_shot.unseen)})")  # fmt: skip
        keep = {dataset.classes.index(c) for c in classes}
        seen, unseen = [c for c in seen if c in keep], [c for c in unseen if c in keep]
    options = loaded.options
    episodes = OneShotEpisodes(
        dataset, seen + unseen, query_size=loaded.config.pretrain.query_size,
        min_exemplar_size=options.min_exemplar_size, num_draws=num_draws or options.num_draws,
    )  # fmt: skip
    if classes:
        evaluated = {label for _, label in episodes.episodes}
        empty = [dataset.classes[c] for c in seen + unseen if c not in evaluated]
        if empty:
            raise DataError(f"exemplar class {', '.join(map(repr, empty))} has no usable test instance in "
                            f"{getattr(dataset, 'source', data_split)} (needs boxes in at least two images)")  # fmt: skip
    loader = make_loader(episodes, collate_one_shot, batch_size or data.batch_size, num_workers, DistInfo(device=device),
                         train=False, seed=0)  # fmt: skip
    result = run_one_shot_evaluation(loaded.model, loader, device, seen, unseen, method=ap_method or options.ap_method,
                                     progress=progress)  # fmt: skip
    result.extra = {"checkpoint": str(checkpoint), "init": loaded.init, "dataset": getattr(dataset, "source", data_split),
                    "num_episodes": len(episodes)}  # fmt: skip
    return result


def evaluate_one_shot(checkpoint: str | Path, **kwargs: Any) -> dict[str, Any]:
    """AP50 of a one-shot checkpoint under the CoAE protocol; deterministic for a checkpoint.

    Keyword arguments: ``data`` (a DataConfig; default the checkpoint's), ``data_split``
    (``val``), ``split`` (one-shot split spec; default the checkpoint's), ``classes``
    (restrict to these names), ``num_draws``, ``ap_method``, ``device``, ``batch_size``,
    ``num_workers``, ``progress``.

    Returns:
        ``{"seen_AP50", "unseen_AP50", "per_class": {name: AP50}, "per_draw": {name: [..]},
        "num_images", "seen", "unseen", "num_draws", "ap_method", "checkpoint", "init",
        "dataset", "num_episodes"}``; AP50 in percent, NaN where undefined.
    """
    return evaluate_one_shot_result(checkpoint, **kwargs).to_dict()
