"""Rebuild a trained model from one of our checkpoints, for eval / predict / query."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError
from ..models import build_detr, build_updetr
from .checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict


@dataclass
class LoadedModel:
    model: nn.Module
    config: Config
    task: str  # detection | pretrain
    classes: list[str]
    category_ids: list[int]


def load_trained_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the model a checkpoint was trained as and load its weights strictly (eval mode)."""
    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise CheckpointError(
            f"{path}: has no 'config' entry, so the architecture is unknown. If it is an official DETR/UP-DETR "
            "file, convert it first: updetr convert SRC.pth DST.pth"
        )
    try:
        cfg = Config.from_dict(ckpt["config"], str(path))
    except ConfigError as err:
        raise CheckpointError(f"{path}: stored config is invalid: {err}") from None
    cfg.model.backbone_weights = "none"  # the weights come from the checkpoint
    task = ckpt.get("task", "detection")
    classes = list(ckpt.get("classes") or [])
    if task == "pretrain":
        model = build_updetr(cfg.model, cfg.pretrain)
        classes = classes or ["patch"]
    elif task == "detection":
        num_classes = cfg.model.num_classes or len(classes)
        if not num_classes:
            raise CheckpointError(f"{path}: stores neither model.num_classes nor the class names")
        model = build_detr(cfg.model, num_classes)
    else:
        raise CheckpointError(f"{path}: task {task!r} cannot be used here (expected detection or pretrain)")
    load_state_dict_strict(model, ckpt["model"], str(path))
    model.to(device).eval()
    if not classes:
        classes = [f"class_{i}" for i in range(model.num_classes)]
    category_ids = list(ckpt.get("category_ids") or range(1, len(classes) + 1))
    return LoadedModel(model=model, config=cfg, task=task, classes=classes, category_ids=category_ids)
