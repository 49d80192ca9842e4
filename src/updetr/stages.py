"""The stage cache of ``updetr demo`` and ``updetr experiment``: one folder per training, named by a hash of
its config, finished when it holds ``DONE``; a re-run reuses every finished stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .config import Config
from .engine.distributed import init_distributed
from .engine.loop import fit

__all__ = ["digest", "is_done", "mark_done", "run_fit", "stage_dir"]


def digest(obj: Any) -> str:
    """10 hex digits of the SHA-256 of ``obj`` as sorted JSON (non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def stage_dir(root: Path, name: str, key: Any) -> Path:
    """The folder of stage ``name`` whose settings are ``key``: ``ROOT/stages/<name>-<digest(key)>``."""
    return root / "stages" / f"{name}-{digest(key)}"


def is_done(path: Path) -> bool:
    """Whether the stage in ``path`` finished (its ``DONE`` file exists)."""
    return (path / "DONE").is_file()


def mark_done(path: Path, info: dict) -> None:
    """Mark the stage in ``path`` finished; ``DONE`` holds ``info`` (its final metrics) as JSON."""
    (path / "DONE").write_text(json.dumps(info, indent=2, default=str) + "\n")


def run_fit(task_cls, cfg: Config, progress: bool) -> dict:
    """Train ``task_cls(cfg)`` into ``cfg.output_dir`` from scratch (a stage interrupted earlier is removed first);
    returns ``{"history", "final"}`` (the metrics of every evaluation and the last one)."""
    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)  # a stage interrupted earlier: start it again cleanly
    result = fit(task_cls(cfg), cfg, init_distributed(cfg.device), progress=progress)
    return {"history": result.history, "final": result.final_metrics}
