"""COCO JSON helpers shared by the data and evaluation layers (no dataset, no model)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from pycocotools.coco import COCO

__all__ = ["coco_from_dict"]


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """A ``pycocotools`` COCO object over an in-memory annotation dict (no printing)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco
