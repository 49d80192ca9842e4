"""One-shot detection: the training task and its evaluation.

:class:`OneShotTask` trains with ``fit`` from ``cfg.init_from`` (an UP-DETR pre-training checkpoint, a
DETR / UP-DETR detection checkpoint) or from scratch; checkpoints land in ``cfg.output_dir``
(``checkpoint.pth``, ``best.pth`` by seen AP50). :func:`updetr.engine.inference.evaluate_one_shot`
``(checkpoint) -> dict`` evaluates a checkpoint under the CoAE protocol (5 query draws per (test image,
class), AP50 per class, means over seen and unseen classes).

Prediction with drawing is :func:`updetr.one_shot_predict.predict_one_shot`; the ``updetr oneshot``
command line is :mod:`updetr.cli.oneshot`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..box_ops import normalized_cxcywh_to_xyxy_px
from ..config import Config
from ..data.build import build_detection_dataset
from ..data.collate import collate_with_patches
from ..data.feature_cache import cache_train_val, collate_features_with_patches
from ..data.io import DataError
from ..data.one_shot import (
    CachedOneShot, OneShotEpisodes, OneShotSplit, OneShotTrainDataset, load_oneshot_split,
)  # fmt: skip
from ..evaluation.one_shot import OneShotEvaluator, OneShotResult
from ..losses.criterion import build_criterion
from ..models.one_shot import MATCH_LABEL, build_one_shot, init_one_shot_from_checkpoint
from ..structures import DetectionOutput
from .checkpoint import CheckpointError
from .detection import targets_to_device

log = logging.getLogger(__name__)


class OneShotTask:
    """One-shot detection for :func:`~updetr.engine.loop.fit` (see ``updetr.data.one_shot`` for the data)."""

    name = "oneshot"
    primary_metric = "AP50_seen"  # picks best.pth; unseen classes must not steer model selection

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.split: OneShotSplit | None = None
        self.classes: list[str] = []
        self.category_ids: list[int] = []
        self.init_kind = "scratch"
        self.only_classes: list[str] | None = None  # evaluate these classes only (None: every seen and unseen one)
        self._train: OneShotTrainDataset | None = None
        self._val: OneShotEpisodes | None = None

    def _adopt(self, dataset) -> OneShotSplit:
        if self.classes and list(dataset.classes) != self.classes:
            raise DataError(f"{getattr(dataset, 'source', 'the dataset')}: classes {list(dataset.classes)} differ from "
                            f"the model's {self.classes}")  # fmt: skip
        self.classes, self.category_ids = list(dataset.classes), list(dataset.category_ids)
        if self.split is None:
            d = self.cfg.data
            self.split = load_oneshot_split(self.cfg.oneshot.split, self.classes, data_root=d.root, data_format=d.format)
        return self.split

    def train_dataset(self) -> OneShotTrainDataset:
        if self._train is None:
            # with cached CNN features the images take the eval transform (flips come from the cache)
            base = build_detection_dataset(self.cfg.data, "train", augment=not self.cfg.data.cache_features)
            self._train = OneShotTrainDataset(
                base, self._adopt(base), query_size=self.cfg.pretrain.query_size,
                min_exemplar_size=self.cfg.oneshot.min_exemplar_size, seed=self.cfg.seed,
                exclude_unseen_images=self.cfg.oneshot.exclude_unseen_images,
            )  # fmt: skip
        return self._train

    def val_dataset(self) -> OneShotEpisodes:
        if self._val is None:
            self._val = self.eval_dataset("val")
        return self._val

    def eval_labels(self, source: str = "the dataset") -> tuple[list[int], list[int]]:
        """(seen, unseen) class indices that evaluation covers: the split's, narrowed to ``only_classes``."""
        split = self.split
        seen, unseen = split.labels(self.classes, source)
        if self.only_classes:
            unknown = [c for c in self.only_classes if c not in self.classes or self.classes.index(c) not in seen + unseen]
            if unknown:
                raise DataError(f"--classes {', '.join(map(repr, unknown))}: not a seen or unseen class of the split "
                                f"(seen: {', '.join(split.seen)}; unseen: {', '.join(split.unseen)})")  # fmt: skip
            keep = {self.classes.index(c) for c in self.only_classes}
            seen, unseen = [c for c in seen if c in keep], [c for c in unseen if c in keep]
        return seen, unseen

    def eval_dataset(self, split: str) -> OneShotEpisodes:
        """The CoAE episodes of a dataset split: every (test image, evaluated class in it), ``num_draws`` patches each."""
        base = build_detection_dataset(self.cfg.data, split)
        self._adopt(base)
        source = getattr(base, "source", split)
        seen, unseen = self.eval_labels(source)
        episodes = OneShotEpisodes(
            base, seen + unseen, query_size=self.cfg.pretrain.query_size,
            min_exemplar_size=self.cfg.oneshot.min_exemplar_size, num_draws=self.cfg.oneshot.num_draws,
        )  # fmt: skip
        if self.only_classes:
            evaluated = {label for _, label in episodes.episodes}
            empty = [self.classes[c] for c in seen + unseen if c not in evaluated]
            if empty:
                raise DataError(f"exemplar class {', '.join(map(repr, empty))} has no usable test instance in {source} "
                                "(needs boxes in at least two images)")  # fmt: skip
        return episodes

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

    def build_architecture(self) -> nn.Module:
        freeze = self.cfg.oneshot.freeze_backbone
        train_backbone = self.cfg.optim.lr_backbone > 0 if freeze is None else not freeze
        return build_one_shot(self.cfg.model, train_backbone=train_backbone)

    def build_model(self) -> nn.Module:
        model = self.build_architecture()
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
        return self.evaluate_result(model, loader, device, progress).metrics()

    def evaluate_result(self, model: nn.Module, loader: DataLoader, device: torch.device,
                        progress: bool = True) -> OneShotResult:
        """:meth:`evaluate` with the per-class and per-draw detail (:class:`OneShotResult`)."""
        seen, unseen = self.eval_labels()
        return run_one_shot_evaluation(model, loader, device, seen, unseen, method=self.cfg.oneshot.ap_method,
                                       progress=progress)  # fmt: skip

    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            "classes": self.classes, "category_ids": self.category_ids,
            "oneshot": {"split": self.split.to_dict() if self.split else None, "init": self.init_kind,
                        "init_from": self.cfg.init_from},
        }  # fmt: skip

    def restore(self, ckpt: dict[str, Any], source: str) -> None:
        meta = ckpt.get("oneshot") or {}
        if not meta.get("split"):
            raise CheckpointError(f"{source}: stores no one-shot split")
        self.split = OneShotSplit(tuple(meta["split"]["seen"]), tuple(meta["split"]["unseen"]))
        self.classes = list(ckpt.get("classes") or [])
        self.category_ids = list(ckpt.get("category_ids") or range(1, len(self.classes) + 1))
        self.init_kind = str(meta.get("init", "scratch"))


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
            boxes_xyxy = normalized_cxcywh_to_xyxy_px(output.boxes_cxcywh.float(), orig_sizes)  # (B, Q, 4)
            for t, s, b in zip(targets, scores, boxes_xyxy):
                evaluator.update(int(t["query_label"]), draw, int(t["image_id"]), s, b)
    evaluator.synchronize()
    return evaluator.summarize()
