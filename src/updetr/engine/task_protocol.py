"""The Task protocol: what every training task gives :func:`~updetr.engine.loop.fit`, the epoch
(:func:`~updetr.engine.epoch.train_one_epoch`) and the inference loader (``updetr.engine.inference``).

The tasks themselves are ``engine.detection``, ``engine.pretrain``, ``engine.one_shot`` and ``engine.panoptic``;
``engine.tasks`` is their table, by the name a checkpoint stores.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..structures import DetectionOutput


class Task(Protocol):
    """One training task: everything ``fit`` and the checkpoint loader need, the same parts for every task.

    The tasks (:data:`updetr.engine.tasks.TASKS`): detection, pretrain, oneshot, panoptic. A task is built from
    a :class:`Config` alone (``TaskClass(cfg)``); its settings are sections of that config.
    """

    name: str  # stored in checkpoints as "task" ("detection", "pretrain", "oneshot", "panoptic")
    primary_metric: str  # the metric that picks ``best.pth`` (higher is better)
    classes: list[str]  # class names, known once a dataset is built or ``restore`` has read a checkpoint
    category_ids: list[int]  # the dataset's category id of each class (COCO JSON ids)

    def train_dataset(self) -> Dataset:
        """The training split, augmented (the eval transform when ``data.cache_features``: flips come from the cache)."""

    def val_dataset(self) -> Dataset | None:
        """What ``fit`` evaluates on after an epoch: ``eval_dataset("val")``, built once."""

    def eval_dataset(self, split: str) -> Dataset:
        """A split at the eval transform, as evaluation reads it (checkpoint evaluation uses this too)."""

    def collate(self, batch: list) -> Any:
        """Samples -> a batch (pixels padded to ``data.size_divisibility``, or cached feature maps)."""

    def cache_features(self, model: nn.Module, device: torch.device, progress: bool = True) -> tuple[Dataset, Dataset | None]:
        """(train, val) datasets whose frozen-CNN maps are computed once (``data.cache_features``)."""

    def build_architecture(self) -> nn.Module:
        """The task's model with fresh weights (the loader fills them from a checkpoint)."""

    def build_model(self) -> nn.Module:
        """``build_architecture`` plus the weights of ``cfg.init_from`` by the task's transfer rules."""

    def build_criterion(self) -> nn.Module:
        """The loss: Hungarian matching and the weighted terms of ``cfg.loss``."""

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[DetectionOutput, list[dict]]:
        """(model output, targets on ``device``) of one batch."""

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, progress: bool) -> dict[str, float]:
        """The task's metrics on ``loader`` (percent)."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint stores beside the weights and the config (classes, categories, one-shot split)."""

    def restore(self, ckpt: dict[str, Any], source: str) -> None:
        """Read ``checkpoint_extra``'s entries back from a checkpoint (``source`` names it in errors)."""
