"""The table of tasks: every task the package trains, by the name its checkpoints store."""

from __future__ import annotations

from ..config import Config, ConfigError
from .detection import DetectionTask
from .one_shot import OneShotTask
from .panoptic import PanopticTask
from .pretrain import PretrainTask
from .task_protocol import Task

__all__ = ["TASKS", "build_task"]

# checkpoint["task"] -> the Task class that trains it (and rebuilds its model for inference)
TASKS: dict[str, type] = {
    DetectionTask.name: DetectionTask,
    PretrainTask.name: PretrainTask,
    OneShotTask.name: OneShotTask,
    PanopticTask.name: PanopticTask,
}


def build_task(name: str, cfg: Config) -> Task:
    """The task ``name`` (a key of :data:`TASKS`) configured by ``cfg``."""
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is not one of {', '.join(TASKS)}")
    return TASKS[name](cfg)
