"""Which config fields a resumed run may change (rule 2 of ``updetr.engine.run_folder``), and the sorting of a
resume's differences into honoured changes and refused ones. Nothing here reads or writes a file.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import Config

__all__ = ["HONOURED_ON_RESUME", "INITIALISATION_ONLY", "flatten", "same_path", "sort_changes"]

#: Config fields a resumed run may change: it uses the new values from its first epoch on.
HONOURED_ON_RESUME = frozenset({
    "optim.epochs", "optim.lr", "optim.lr_backbone", "optim.lr_drop", "optim.weight_decay", "optim.clip_max_norm",
    "optim.amp", "eval_every", "max_steps_per_epoch", "device", "output_dir", "data.batch_size", "data.num_workers",
    "data.root", "data.train_images", "data.train_annotations", "data.val_images", "data.val_annotations",
    "data.images",
})
#: Config fields that only initialise a run; a resume keeps the stored value.
INITIALISATION_ONLY = frozenset({"model.backbone_weights", "init_from"})


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.field": value}``."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def same_path(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def sort_changes(stored: Config, requested: Config) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]], list[str]]:
    """Sort the fields in which ``requested`` differs from a checkpoint's ``stored`` config.

    Returns:
        ``(effective, honoured, refused)``: the config the resumed run trains with, as a dict (the requested
        one, with :data:`INITIALISATION_ONLY` fields left empty taking their stored values);
        ``{field: (stored, new)}`` of the :data:`HONOURED_ON_RESUME` changes; a description of every refused
        change (any other field, a non-empty initialisation field, a frozen CNN made trainable or the reverse).
    """
    old = flatten(stored.to_dict())
    new = flatten(requested.to_dict())
    effective = requested.to_dict()
    refused, honoured = [], {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key == "output_dir" and a is not None and b is not None and same_path(a, b):
            continue
        if a == b:
            continue
        if key in INITIALISATION_ONLY:
            if b in ("", "none", None):
                section, _, name = key.rpartition(".")
                (effective[section] if section else effective)[name] = a  # the run was initialised so
                continue
            refused.append(f"{key} {a!r} -> {b!r} (it only initialises a run; the weights come from the checkpoint)")
        elif key in HONOURED_ON_RESUME:
            honoured[key] = (a, b)
        else:
            refused.append(f"{key} {a!r} -> {b!r}")
    lr_backbone = honoured.get("optim.lr_backbone")
    if lr_backbone and (lr_backbone[0] == 0) != (lr_backbone[1] == 0):
        refused.append(f"optim.lr_backbone {lr_backbone[0]!r} -> {lr_backbone[1]!r} (a frozen CNN cannot become "
                       "trainable, nor a trained one frozen, in a resumed run)")
    return effective, honoured, refused
