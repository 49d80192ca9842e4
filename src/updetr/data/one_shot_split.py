"""The one-shot split (paper §3.2, §4.3; docs/method.md §3): which classes are *seen* (trained on) and which
*unseen* (evaluated only); dataset classes in neither list are ignored (never a query, never a target).

:func:`load_oneshot_split` reads the paper's VOC split (:data:`PAPER_VOC_SPLIT`), the embedded benchmark's
``oneshot_split.json``, any ``{"seen": [...], "unseen": [...]}`` JSON file, or an inline
``unseen=a,b[;seen=c,d]`` (seen defaults to every other class).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from updetr.data.io import DataError

__all__ = ["PAPER_VOC_SPLIT", "OneShotSplit", "load_oneshot_split"]


@dataclass(frozen=True)
class OneShotSplit:
    """Class names trained on (``seen``) and evaluated only (``unseen``); disjoint."""

    seen: tuple[str, ...]
    unseen: tuple[str, ...]

    def __post_init__(self) -> None:
        both = sorted(set(self.seen) & set(self.unseen))
        if both:
            raise DataError(f"one-shot split: {both} are listed as both seen and unseen")
        if not self.seen:
            raise DataError("one-shot split: no seen class (training needs at least one)")

    def labels(self, classes: Sequence[str], source: str = "the dataset") -> tuple[list[int], list[int]]:
        """(seen, unseen) contiguous labels in ``classes``; an unknown name is a DataError naming it."""
        unknown = [name for name in self.seen + self.unseen if name not in classes]
        if unknown:
            raise DataError(
                f"one-shot split names {', '.join(map(repr, unknown))}, not a class of {source} "
                f"(its classes: {', '.join(classes)})"
            )
        return [classes.index(n) for n in self.seen], [classes.index(n) for n in self.unseen]

    def to_dict(self) -> dict[str, list[str]]:
        return {"seen": list(self.seen), "unseen": list(self.unseen)}


#: Paper Table 3 / CoAE: 16 seen VOC classes, 4 unseen (cow, sheep, cat, aeroplane).
PAPER_VOC_SPLIT = OneShotSplit(
    seen=("pottedplant", "sofa", "tvmonitor", "car", "bottle", "boat", "chair", "person", "bus", "train",
          "horse", "bicycle", "dog", "bird", "motorbike", "diningtable"),  # fmt: skip
    unseen=("cow", "sheep", "cat", "aeroplane"),
)


def load_oneshot_split(
    spec: str | Mapping[str, Sequence[str]] | OneShotSplit,
    classes: Sequence[str],
    *,
    data_root: str = "",
    data_format: str = "coco",
) -> OneShotSplit:
    """Resolve a split description against the dataset's ``classes`` (validated).

    ``spec``: ``""`` (``data_root/oneshot_split.json`` when it exists, else the paper's VOC
    split for ``data_format == "voc"``), ``"voc"``, ``"embedded"`` (``data_root/oneshot_split.json``),
    a JSON file or a folder holding ``oneshot_split.json``, ``"unseen=a,b[;seen=c,d]"``,
    a ``{"seen", "unseen"}`` mapping or a :class:`OneShotSplit`.

    Raises:
        DataError: unreadable file, malformed spec, or a class name not in ``classes``.
    """
    if isinstance(spec, OneShotSplit):
        split = spec
    elif isinstance(spec, Mapping):
        split = _from_mapping(spec, "split")
    else:
        spec = spec.strip()
        root_file = Path(data_root) / "oneshot_split.json" if data_root else None
        if spec == "":
            if root_file is not None and root_file.is_file():
                spec = str(root_file)
            elif data_format == "voc":
                spec = "voc"
            else:
                raise DataError(
                    "no one-shot split given: pass --split (voc | a JSON file with 'seen' and 'unseen' class names "
                    f"| 'unseen=a,b'), or put oneshot_split.json in data.root ({data_root or 'unset'})"
                )
        if spec == "voc":
            split = PAPER_VOC_SPLIT
        elif spec == "embedded":
            if root_file is None:
                raise DataError("split 'embedded' needs data.root, the embedded benchmark folder")
            split = _from_file(root_file)
        elif "=" in spec and not Path(spec).exists():
            split = _from_inline(spec, classes)
        else:
            path = Path(spec)
            split = _from_file(path / "oneshot_split.json" if path.is_dir() else path)
    split.labels(classes)
    return split


def _from_mapping(data: Mapping, source: str) -> OneShotSplit:
    if not isinstance(data, Mapping) or set(data) != {"seen", "unseen"}:
        raise DataError(f"{source}: a one-shot split must hold exactly 'seen' and 'unseen' lists of class names")
    lists = [data["seen"], data["unseen"]]
    if not all(isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v) for v in lists):
        raise DataError(f"{source}: 'seen' and 'unseen' must be lists of class names")
    return OneShotSplit(tuple(lists[0]), tuple(lists[1]))


def _from_file(path: Path) -> OneShotSplit:
    if not path.is_file():
        raise DataError(f"{path}: one-shot split file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the one-shot split ({err})") from None
    return _from_mapping(data, str(path))


def _from_inline(spec: str, classes: Sequence[str]) -> OneShotSplit:
    parts = {}
    for item in spec.split(";"):
        key, sep, names = item.partition("=")
        if not sep or key.strip() not in ("seen", "unseen"):
            raise DataError(f"split {spec!r}: expected 'unseen=a,b' optionally followed by ';seen=c,d'")
        parts[key.strip()] = tuple(n.strip() for n in names.split(",") if n.strip())
    if "unseen" not in parts:
        raise DataError(f"split {spec!r}: names no unseen class")
    seen = parts.get("seen", tuple(c for c in classes if c not in parts["unseen"]))
    return OneShotSplit(seen, parts["unseen"])
