"""The runs of ``updetr experiment``'s protocol as data: what :mod:`updetr.experiment` plans and runs, and
:mod:`updetr.experiment_report` reads back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .engine.tasks import TASKS

__all__ = ["LENGTH_FRACTIONS", "Run", "SeedPlan", "length_points"]

LENGTH_FRACTIONS = (0.25, 0.5, 1.0)  # pre-training length points, as fractions of P


@dataclass(frozen=True)
class Run:
    """One training run of the protocol (a demo stage)."""

    name: str  # variant: "default", "single_patch", ... for pre-training; "detr_F", "default_2F", ... for fine-tuning
    seed: int
    kind: str  # "pretrain" | "detr" | "updetr" (shared with ``updetr demo``) | "oneshot" | "panoptic1" | "panoptic2"
    label: str  # what the progress line says
    cfg: Config
    path: Path  # the stage folder
    epochs: int

    @property
    def task(self) -> type:
        """The Task class that trains this run (its config says everything else, panoptic stage included)."""
        if self.kind.startswith("panoptic"):  # stage 1 (detector on boxes) or 2 (frozen detector, mask head)
            return TASKS["panoptic"]
        return TASKS.get(self.kind, TASKS["detection"])  # "detr" and "updetr" are detection runs


@dataclass
class SeedPlan:
    """Every run of one seed, by variant name; several names may share one stage folder."""

    seed: int
    data_dir: Path
    pretrain: dict[str, Run]
    finetune: dict[str, Run]
    oneshot: dict[str, Run] = field(default_factory=dict)  # "detr" (from scratch), "updetr" (default pre-training)
    panoptic: dict[str, Run] = field(default_factory=dict)  # "detr_1", "detr_2", "updetr_1", "updetr_2" (stages)


def length_points(pretrain_epochs: int) -> list[int]:
    """Distinct whole numbers of pre-training epochs for ``LENGTH_FRACTIONS`` of P (at least 1)."""
    return sorted({max(1, round(f * pretrain_epochs)) for f in LENGTH_FRACTIONS})
