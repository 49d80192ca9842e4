"""Pascal VOC detection (VOC2007 / VOC2012 devkit layout), COCO-style.

All XML files are parsed once at construction and turned into a COCO-format dict, so the
dataset serves the same targets as :class:`~updetr.data.coco.CocoDetection` and its
``coco`` object lets the COCO evaluator report COCO-style AP on VOC.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from updetr.data.coco import CocoStyleDataset, Transforms
from updetr.data.io import DataError

__all__ = ["VOC_CLASSES", "VOCDetection"]

logger = logging.getLogger(__name__)

#: The 20 Pascal VOC classes, alphabetical; label ``i`` has category id ``i + 1``.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

_DIFFICULT_MODES = ("crowd", "include", "exclude")


class VOCDetection(CocoStyleDataset):
    """Pascal VOC detection from a ``VOCdevkit`` folder.

    Args:
        root: a ``VOCdevkit`` folder (holding ``VOC2007/``, ``VOC2012/``, each with
            ``Annotations/*.xml``, ``ImageSets/Main/<set>.txt``, ``JPEGImages/*.jpg``), or a
            folder that holds ``VOCdevkit/``.
        sets: ``"YEAR/IMAGESET"`` entries, e.g. ``["2007/trainval", "2012/trainval"]``.
        transforms: applied to ``(image, target)`` last (see ``updetr.data.transforms``).
        difficult: objects marked difficult are ``"crowd"``: kept with ``iscrowd=1`` (ignored
            by the loss and, as in VOC's own metric, by the COCO evaluator), ``"include"``:
            normal objects, ``"exclude"``: dropped.

    Boxes: VOC pixel coordinates are 1-based and inclusive; they become 0-based ``xyxy``
    pixels ``(xmin - 1, ymin - 1, xmax, ymax)``. Labels index :data:`VOC_CLASSES`;
    ``category_ids`` are 1..20. Image ids are ``1 + index`` in the sorted list of the
    selected ``VOC<year>/JPEGImages/<name>.jpg`` files (stable for a given ``sets``); the
    ``file_name`` of each image (relative to the devkit) is kept in ``coco.imgs``.

    Raises:
        DataError: missing folders/files, malformed XML or an unknown class name (the
            message names the XML file), or missing images.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        sets: Sequence[str] = ("2007/trainval",),
        transforms: Transforms | None = None,
        *,
        difficult: str = "crowd",
    ) -> None:
        if difficult not in _DIFFICULT_MODES:
            raise ValueError(f"difficult={difficult!r} is not one of {', '.join(_DIFFICULT_MODES)}")
        if isinstance(sets, str):
            sets = [sets]
        self.difficult = difficult
        self.devkit = _find_devkit(Path(root), sets)
        names = sorted(
            {(year, name) for year, image_set in map(_split_set, sets) for name in self._read_set(year, image_set)}
        )  # (year, image name), unique across sets

        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        paths = {}
        for index, (year, name) in enumerate(names):
            image_id = index + 1
            xml_path = self.devkit / f"VOC{year}" / "Annotations" / f"{name}.xml"
            height, width, objects = _parse_xml(xml_path)
            file_name = f"VOC{year}/JPEGImages/{name}.jpg"
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            paths[image_id] = self.devkit / file_name
            for label, is_difficult, (x0, y0, x1, y1) in objects:
                if is_difficult and difficult == "exclude":
                    continue
                box_w, box_h = x1 - x0, y1 - y0
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x0, y0, box_w, box_h],  # xywh, 0-based pixels
                    "area": max(box_w, 0.0) * max(box_h, 0.0),
                    "iscrowd": int(is_difficult and difficult == "crowd"),
                })
        data = {
            "info": {"description": f"Pascal VOC {', '.join(sets)} (difficult={difficult})"},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(VOC_CLASSES)],
        }
        source = f"{self.devkit} ({', '.join(sets)})"
        self._setup(data, paths, source, transforms, return_masks=False)
        logger.info("%s: %d images, %d boxes", source, len(self), len(self._boxes))

    def _read_set(self, year: str, image_set: str) -> list[str]:
        path = self.devkit / f"VOC{year}" / "ImageSets" / "Main" / f"{image_set}.txt"
        if not path.is_file():
            raise DataError(f"{path}: image set file not found")
        names = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if parts:
                if parts[0] in (".", "..") or "/" in parts[0] or "\\" in parts[0]:  # would lead out of JPEGImages/
                    raise DataError(f"{path}: line {number} names {parts[0]!r}; VOC image names are plain file names "
                                    "such as 000005, not paths")
                names.append(parts[0])
        return names


def _split_set(entry: str) -> tuple[str, str]:
    year, sep, image_set = entry.partition("/")
    if not sep or not year.isdigit() or not image_set:
        raise DataError(f"VOC set {entry!r} must look like 'YEAR/IMAGESET', e.g. '2007/trainval'")
    return year, image_set


def _find_devkit(root: Path, sets: Sequence[str]) -> Path:
    """``root`` itself when it holds ``VOC<year>/`` folders, else ``root/VOCdevkit``."""
    years = sorted({_split_set(s)[0] for s in sets})
    if not root.is_dir():
        raise DataError(f"{root}: VOC root folder not found")
    for candidate in (root, root / "VOCdevkit"):
        if any((candidate / f"VOC{year}").is_dir() for year in years):
            missing = [f"VOC{y}" for y in years if not (candidate / f"VOC{y}").is_dir()]
            if missing:
                raise DataError(f"{candidate}: missing {', '.join(missing)} folder(s) needed by sets {list(sets)}")
            return candidate
    raise DataError(
        f"{root}: no {', '.join(f'VOC{y}' for y in years)} folder here or in {root / 'VOCdevkit'} "
        "(expected a VOCdevkit folder)"
    )


def _parse_xml(path: Path) -> tuple[int, int, list[tuple[int, bool, tuple[float, float, float, float]]]]:
    """One VOC annotation file -> (height, width, [(label, difficult, xyxy 0-based pixels)])."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path}: malformed XML ({err})") from None
    try:
        height = int(float(root.findtext("size/height", "")))
        width = int(float(root.findtext("size/width", "")))
    except ValueError:
        raise DataError(f"{path}: missing or invalid <size><height>/<width>") from None
    if height <= 0 or width <= 0:
        raise DataError(f"{path}: invalid image size {height}x{width}")
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataError(f"{path}: object {k} has unknown class name {name!r} (expected one of the 20 VOC classes)")
        try:
            difficult = int(float(obj.findtext("difficult") or 0)) != 0
            corners = ("xmin", "ymin", "xmax", "ymax")
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{key}", "")) for key in corners)
        except ValueError:
            raise DataError(f"{path}: object {k} ({name}) has a missing or invalid <bndbox>/<difficult>") from None
        if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):  # float() reads "nan" and "inf"
            raise DataError(f"{path}: object {k} ({name}) has a non-finite <bndbox> coordinate "
                            f"({xmin}, {ymin}, {xmax}, {ymax})")
        objects.append((VOC_CLASSES.index(name), difficult, (xmin - 1.0, ymin - 1.0, xmax, ymax)))
    return height, width, objects
