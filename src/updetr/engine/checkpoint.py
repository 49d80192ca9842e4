"""Checkpoints: atomic saving, safe loading (``weights_only=True``), strict weight transfer."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..serialization import CheckpointError, first_line, refused_message, safe_torch_load  # noqa: F401 (re-exported)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically and durably.

    The bytes go to ``<path>.tmp``, are flushed to disk (``fsync``), and the temporary file is
    renamed over ``path``; the folder entry is synced too. A kill at any instant leaves either
    the old file or the complete new one at ``path`` (at worst a stale ``.tmp`` next to it).

    Raises:
        CheckpointError: the file cannot be written (permission, disk full, ...); the message
            names the file and the reason, the previous file at ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        raise CheckpointError(f"{path}: cannot write the checkpoint ({reason})") from None
    fsync_folder(path.parent)


def fsync_folder(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict without executing pickled code (:func:`safe_torch_load`).

    A bare state dict (tensors only) is returned as ``{"model": state}``.

    Raises:
        CheckpointError: unreadable (see :func:`safe_torch_load`), not a dict, or without a
            ``model`` state dict; the message names the file.
    """
    path = Path(path)
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    if "model" not in ckpt and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"model": ckpt}  # a bare state dict
    if not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: has no 'model' state dict (keys: {format_keys(sorted(map(str, ckpt)))})")
    return ckpt


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


def format_keys(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source}: weights do not fit the model.\n  missing: {format_keys(missing)}\n"
            f"  unexpected: {format_keys(unexpected)}\n  wrong shape (checkpoint vs model): {format_keys(shapes)}"
        )
    model.load_state_dict(state, strict=True)


# Modules that exist only for a pre-training/one-shot task and never transfer to a detector.
TASK_SPECIFIC_PREFIXES = ("class_embed.", "patch2query.", "feature_align.")


def init_from_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    drop_prefixes: tuple[str, ...] = TASK_SPECIFIC_PREFIXES,
    checkpoint: dict[str, Any] | None = None,
) -> dict[str, list[str]]:
    """Initialise ``model`` from another task's checkpoint (fine-tuning).

    Keys under ``drop_prefixes`` are dropped from the checkpoint *and* left at their fresh
    initialisation in the model (the task head). Every other model key must be present
    with the same shape, and the checkpoint may carry no other key: an architecture
    mismatch (e.g. pre-norm vs post-norm, other depth or width) is an error listing keys.
    ``checkpoint`` is the file already read with :func:`load_checkpoint`, when the caller
    needed it first (``path`` then only names it in messages).
    Returns ``{"loaded": [...], "dropped": [...], "kept_fresh": [...]}``.
    """
    ckpt = checkpoint if checkpoint is not None else load_checkpoint(path)
    state = ckpt["model"]
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    dropped = sorted(k for k in state if k.startswith(drop_prefixes))
    kept_fresh = sorted(k for k in own if k.startswith(drop_prefixes))
    source = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    target = {k: v for k, v in own.items() if not k.startswith(drop_prefixes)}
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    shapes = sorted(f"{k} {tuple(source[k].shape)} vs {tuple(target[k].shape)}" for k in set(target) & set(source) if target[k].shape != source[k].shape)
    if missing or unexpected or shapes:
        hint = ""
        if any("encoder.norm" in k for k in missing + unexpected):
            hint = "\n  hint: transformer.encoder.norm exists only with pre-norm; set model.pre_norm to match the checkpoint"
        raise CheckpointError(
            f"{path}: architecture does not match the model being initialised.\n"
            f"  missing from checkpoint: {format_keys(missing)}\n  not in model: {format_keys(unexpected)}\n"
            f"  wrong shape (checkpoint vs model): {format_keys(shapes)}{hint}"
        )
    model.load_state_dict({**own, **source}, strict=True)
    return {"loaded": sorted(source), "dropped": dropped, "kept_fresh": kept_fresh}
