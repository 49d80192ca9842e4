"""Checkpoint files: reading ``.pth`` files safely (``torch.load(weights_only=True)`` with one-line errors naming
the file), atomic saving, and strict weight transfer into a model.

The lowest layer of the package (models, data and engine all read files through it): nothing pickled in a file
is ever executed, and a refused file is called what it is, never "truncated".
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not fit the model; the message names the file."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when there is none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE_PROTOCOL = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format)


def safe_torch_load(path: str | Path, *, what: str = "checkpoint", extra_globals: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with one-line errors naming the file.

    Nothing pickled in the file is executed: only tensors, plain containers and numbers are
    read (plus the classes in ``extra_globals``, e.g. ``argparse.Namespace``).

    Raises:
        CheckpointError: the path is missing or a folder, the file is empty, not a PyTorch
            file, truncated, unreadable, or carries objects that are not plain data (then the
            message says it was not loaded for safety, and names the object when it can).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a {what} file")
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    if not head:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a {what}")
    if not head.startswith(_ZIP_MAGIC) and head[0] != _PICKLE_PROTOCOL:
        kind = "a text file" if _looks_like_text(head) else "neither a zip archive nor a pickle"
        raise CheckpointError(f"{path}: not a PyTorch {what} (it is {kind}, starting with {head!r})")
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            raise CheckpointError(refused_message(path, err, what)) from None
        raise CheckpointError(f"{path}: not a readable PyTorch {what} (truncated or corrupt: {first_line(err)})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the {what} ({err.strerror or first_line(err)})") from None
    except Exception as err:  # truncated zip (RuntimeError), cut pickles (EOFError), garbage (KeyError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch {what} (truncated or corrupt: {first_line(err)})") from None


def refused_message(path: Path, err: BaseException, what: str = "checkpoint") -> str:
    """Why a file that ``weights_only`` loading refused was not loaded (never torch's advice to
    switch the safety off)."""
    text = str(err)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        detail = f"it pickles {found.group(1)}"
    elif re.search(r"Unsupported operand", text):
        detail = "it uses pickle instructions that plain data does not need"
    else:
        detail = "its pickle is not plain data"
    return (f"{path}: not loaded, for safety: the {what} carries code or objects that are not plain data ({detail}); "
            "updetr reads only tensors, numbers, strings and containers and never runs code from a file")


def _looks_like_text(head: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in head)


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
