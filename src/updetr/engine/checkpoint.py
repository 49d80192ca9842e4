"""The training loop's checkpoint state: the random-number generators' state, saved and restored on resume.

Checkpoint files themselves (atomic saving, safe loading, strict weight transfer) are read and written by
:mod:`updetr.serialization`, the lowest layer, so that models and data can load weights too; their names are
re-exported here, where they lived before.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..serialization import (  # noqa: F401 (re-exported)
    TASK_SPECIFIC_PREFIXES, CheckpointError, first_line, format_keys, fsync_folder, init_from_checkpoint, load_checkpoint,
    load_state_dict_strict, refused_message, safe_torch_load, save_checkpoint,
)  # fmt: skip

__all__ = [
    "TASK_SPECIFIC_PREFIXES", "CheckpointError", "first_line", "format_keys", "fsync_folder", "init_from_checkpoint",
    "load_checkpoint", "load_state_dict_strict", "refused_message", "rng_state", "safe_torch_load", "save_checkpoint",
    "set_rng_state",
]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((state["python_version"], tuple(int(x) for x in py[:-1]), None if py[-1] == -1 else py[-1]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
