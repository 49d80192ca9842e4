"""Reading ``.pth`` files safely: ``torch.load(weights_only=True)`` with one-line errors naming the file.

The lowest layer of the package (models, data and engine all read files through it): nothing pickled in a file
is ever executed, and a refused file is called what it is, never "truncated".
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


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
