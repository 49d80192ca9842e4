"""Rebuild a trained model from one of our checkpoints, and evaluate a checkpoint exactly as training does.

:func:`load_trained` is the one loader of every task's checkpoints (``eval``, ``predict``, ``query``,
``serve``, ``export``): it rebuilds the task from the stored config (:data:`updetr.engine.tasks.TASKS`),
reads the task's metadata back, builds the model and loads its weights strictly.
:func:`evaluate_checkpoint` evaluates with the task's own dataset, batching (``collate``) and metric
(``evaluate``), the ones ``fit`` uses after each epoch, so a checkpoint scores on the command line what it
scored during training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import Config, ConfigError, PanopticConfig
from ..data.one_shot_split import OneShotSplit, load_oneshot_split
from ..evaluation.one_shot import OneShotResult
from .checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict
from .distributed import DistInfo, resolve_device
from .loop import make_loader
from .one_shot import OneShotTask
from .panoptic import PanopticTask
from .task_protocol import Task
from .tasks import TASKS, build_task

__all__ = [
    "LoadedModel", "TRAINED_BY", "evaluate_checkpoint", "evaluate_loaded", "evaluate_one_shot", "evaluate_one_shot_result",
    "evaluation_loader", "load_trained",
]

# overrides that would change the model a checkpoint's weights were trained as
ARCHITECTURE_FIELDS = ("model.", "pretrain.", "panoptic.stage=")

# the command that trains each task, named when a checkpoint of another task is given
TRAINED_BY = {"detection": "updetr train", "pretrain": "updetr pretrain", "oneshot": "updetr oneshot train",
              "panoptic": "updetr panoptic train"}


@dataclass
class LoadedModel:
    """A trained model in eval mode, with what its checkpoint says about it."""

    model: nn.Module
    config: Config  # the stored config (``model.backbone_weights`` = none: the weights came from the checkpoint)
    task: str  # detection | pretrain | oneshot | panoptic
    classes: list[str]
    category_ids: list[int]
    runner: Task  # the task rebuilt from the config; its eval_dataset / collate / evaluate are training's
    categories: list[dict[str, Any]] = field(default_factory=list)  # panoptic: id, name, isthing, color
    split: OneShotSplit | None = None  # one-shot: the seen / unseen classes it was trained with
    init: str = ""  # one-shot: how training started (updetr-pretrain | detection | oneshot | scratch)

    @property
    def isthing(self) -> list[bool]:
        return [bool(c["isthing"]) for c in self.categories]


def _config(ckpt: dict[str, Any], path: str | Path) -> Config:
    try:
        cfg = Config.from_dict(ckpt["config"], str(path))
    except ConfigError as err:
        raise CheckpointError(f"{path}: stored config is invalid: {err}") from None
    # checkpoints written before the settings were config sections kept them beside the config
    if "panoptic" not in ckpt["config"] and isinstance(ckpt.get("panoptic"), dict):
        names = set(PanopticConfig.__dataclass_fields__)
        unknown = sorted(set(ckpt["panoptic"]) - names)
        if unknown:
            raise CheckpointError(f"{path}: unknown panoptic options {unknown}")
        cfg.panoptic = PanopticConfig(**ckpt["panoptic"])
    options = (ckpt.get("oneshot") or {}).get("options")
    if isinstance(options, dict):
        cfg = cfg.override([f"oneshot.{k}={json.dumps(v)}" for k, v in options.items() if k in cfg.oneshot.__dataclass_fields__])
    cfg.model.backbone_weights = "none"  # the weights come from the checkpoint
    cfg.init_from = ""
    cfg.data.cache_features = False  # inference reads pixels: cached CNN maps are a training-time shortcut
    return cfg.validate()


def load_trained(path: str | Path, device: torch.device | str = "cpu", *, tasks: tuple[str, ...] | None = None,
                 overrides: list[str] | None = None) -> LoadedModel:
    """Build the model a checkpoint was trained as and load its weights strictly (eval mode).

    ``tasks``: the tasks the caller can use (others are a clear error naming the command that can);
    ``overrides``: ``section.field=value`` applied to the stored config first (where the data lies, the
    post-processing), never changing the architecture.
    """
    ckpt = load_checkpoint(path)
    name = ckpt.get("task", "detection")
    if tasks is not None and name not in tasks:
        trainers = " or ".join(f"`{TRAINED_BY[t]}`" for t in tasks)
        hint = f" (to start from its weights: {TRAINED_BY[tasks[0]]} --init-from {path})" if tasks[0] != "pretrain" else ""
        raise CheckpointError(f"{path}: is a {name!r} checkpoint, not one from {trainers}{hint}")
    if "config" not in ckpt:
        raise CheckpointError(
            f"{path}: has no 'config' entry, so the architecture is unknown. If it is an official DETR/UP-DETR "
            "file, convert it first: updetr convert SRC.pth DST.pth"
        )
    if name not in TASKS:
        raise CheckpointError(f"{path}: task {name!r} is not one of {', '.join(TASKS)}")
    cfg = _config(ckpt, path)
    if overrides:
        fixed = [o for o in overrides if o.strip().startswith(ARCHITECTURE_FIELDS)]
        if fixed:
            raise ConfigError(f"{path}: {fixed[0]}: the architecture (model.*, pretrain.*, panoptic.stage) is the "
                              "checkpoint's")
        cfg = cfg.override(list(overrides))
    runner = build_task(name, cfg)
    runner.restore(ckpt, str(path))
    model = runner.build_architecture()
    load_state_dict_strict(model, ckpt["model"], str(path))
    model.to(device).eval()
    loaded = LoadedModel(model=model, config=cfg, task=name, classes=list(runner.classes),
                         category_ids=list(runner.category_ids), runner=runner)
    if isinstance(runner, OneShotTask):
        loaded.split, loaded.init = runner.split, runner.init_kind
    if isinstance(runner, PanopticTask):
        loaded.categories = list(runner.categories)
    return loaded


def _resolve(device: str | torch.device) -> torch.device:
    return resolve_device(device) if isinstance(device, str) else device


def evaluation_loader(loaded: LoadedModel, dataset: Dataset, device: torch.device, batch_size: int | None = None,
                      num_workers: int | None = None):
    """The loader ``fit`` evaluates with: the task's collate, the config's batch size, in order."""
    data = loaded.config.data
    return make_loader(dataset, loaded.runner.collate, batch_size or data.batch_size,
                       data.num_workers if num_workers is None else num_workers, DistInfo(device=device),
                       train=False, seed=loaded.config.seed)


@torch.inference_mode()
def evaluate_loaded(loaded: LoadedModel, split: str = "val", device: str | torch.device = "cpu", *,
                    progress: bool = False) -> tuple[dict[str, float], Dataset]:
    """(metrics, dataset) of a loaded model on ``split``, with the task's dataset, batching and metric, on pixels
    (:func:`load_trained` turns ``data.cache_features`` off)."""
    device = _resolve(device)
    dataset = loaded.runner.eval_dataset(split)
    metrics = loaded.runner.evaluate(loaded.model, evaluation_loader(loaded, dataset, device), device, progress)
    return metrics, dataset


def evaluate_checkpoint(path: str | Path, *, split: str = "val", overrides: list[str] | None = None,
                        device: str | torch.device = "auto", progress: bool = False,
                        tasks: tuple[str, ...] | None = None) -> dict[str, float]:
    """The metrics of a checkpoint on ``split`` as ``fit`` evaluates it (``overrides``: see :func:`load_trained`)."""
    device = _resolve(device)
    loaded = load_trained(path, device, tasks=tasks, overrides=overrides)
    return evaluate_loaded(loaded, split, device, progress=progress)[0]


@torch.inference_mode()
def evaluate_one_shot_result(
    checkpoint: str | Path, *, overrides: list[str] | None = None, data_split: str = "val", split: str | None = None,
    classes: list[str] | None = None, device: str | torch.device = "auto", batch_size: int | None = None,
    num_workers: int = 0, progress: bool = False,
) -> OneShotResult:
    """:func:`evaluate_one_shot` returning the :class:`OneShotResult`."""
    device = _resolve(device)
    loaded = load_trained(checkpoint, device, tasks=("oneshot",), overrides=overrides)
    runner: OneShotTask = loaded.runner  # type: ignore[assignment]
    data = loaded.config.data
    if split is not None:
        runner.split = load_oneshot_split(split, runner.classes, data_root=data.root, data_format=data.format)
    runner.only_classes = list(classes) if classes else None
    episodes = runner.eval_dataset(data_split)
    loader = evaluation_loader(loaded, episodes, device, batch_size, num_workers)
    result = runner.evaluate_result(loaded.model, loader, device, progress)
    result.extra = {"checkpoint": str(checkpoint), "init": loaded.init,
                    "dataset": getattr(episodes.dataset, "source", data_split), "num_episodes": len(episodes)}
    return result


def evaluate_one_shot(checkpoint: str | Path, **kwargs: Any) -> dict[str, Any]:
    """AP50 of a one-shot checkpoint under the CoAE protocol; deterministic for a checkpoint.

    Keyword arguments: ``overrides`` (``section.field=value`` on the stored config: ``data.*`` for where the
    test images lie, ``oneshot.num_draws``, ``oneshot.ap_method``), ``data_split`` (``val``), ``split``
    (one-shot split spec; default the checkpoint's), ``classes`` (restrict to these names), ``device``,
    ``batch_size``, ``num_workers``, ``progress``.

    Returns:
        ``{"seen_AP50", "unseen_AP50", "per_class": {name: AP50}, "per_draw": {name: [..]},
        "num_images", "seen", "unseen", "num_draws", "ap_method", "checkpoint", "init",
        "dataset", "num_episodes"}``; AP50 in percent, NaN where undefined.
    """
    return evaluate_one_shot_result(checkpoint, **kwargs).to_dict()
