"""The embedded benchmark: an offline, deterministic detection dataset built from bundled material.

Every demo, test and experiment of the project runs on it, because nothing may be downloaded. It is written to
disk exactly as the real datasets are, so the COCO, COCO-panoptic and unlabelled-image loaders read it unchanged:

    out_dir/train/000000.jpg ...            labelled images (JPEG quality 95), likewise val/
    out_dir/unlabeled/000000.jpg ...        images generated the same way, with no annotations (pre-training)
    out_dir/annotations/instances_{train,val}.json   COCO detection: bbox xywh pixels, RLE of the visible mask
    out_dir/annotations/panoptic_{train,val}.json    COCO panoptic, with PNGs in panoptic_{train,val}/
    out_dir/oneshot_split.json              {"seen": [...], "unseen": [...]} thing-class names
    out_dir/meta.json                       generation arguments, format version, per-split counts

The pictures and textures everything is made of are ``updetr.data.embedded_sources`` (bundled with installed
packages); how one image is composed from them (a photographed background, stuff textures, pasted objects) is
``updetr.data.embedded_compose``; this module writes the splits and their annotations.

Category ids: things 1..14 in ``EMBEDDED_THING_CLASSES`` order, stuff 15..18 in ``EMBEDDED_STUFF_CLASSES``
order. ``instances_*.json`` holds the things only. Image ids are 1-based within each split.

Determinism: image i of a split is drawn from ``numpy.random.default_rng([seed, split_stream, i])``, so the
same arguments give the same bytes, and the unlabelled split is a different random stream from train and val.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from updetr.data.embedded_compose import DEFAULT_MAX_OBJECTS, DEFAULT_OBJECT_SIZE, Composite, compose
from updetr.data.embedded_sources import (
    EMBEDDED_STUFF_CLASSES,
    EMBEDDED_THING_CLASSES,
    ONESHOT_UNSEEN,
    STUFF_TINTS,
    THING_SOURCES,
    Assets,
    load_assets,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: photographed objects an ImageNet CNN knows (1: digits and drawn shapes)

# where a generated benchmark keeps each part, as ``data.*`` config values relative to its root
EMBEDDED_LAYOUT: dict[str, str] = {
    "format": "coco",
    "train_images": "train",
    "train_annotations": "annotations/instances_train.json",
    "val_images": "val",
    "val_annotations": "annotations/instances_val.json",
    "images": "unlabeled",
}


def embedded_data_overrides(root: str | os.PathLike[str]) -> list[str]:
    """Config overrides (``data.root`` and :data:`EMBEDDED_LAYOUT`) that point a run at the benchmark in ``root``."""
    return [f"data.root={json.dumps(str(Path(root)))}"] + [f"data.{k}={json.dumps(v)}" for k, v in EMBEDDED_LAYOUT.items()]


def load_split(out_dir: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read ``out_dir/oneshot_split.json``: ``{"seen": [thing names], "unseen": [thing names]}``."""
    with open(Path(out_dir) / "oneshot_split.json") as f:
        split = json.load(f)
    if set(split) != {"seen", "unseen"} or set(split["seen"]) & set(split["unseen"]):
        raise ValueError(f"{out_dir}/oneshot_split.json must hold disjoint 'seen' and 'unseen' lists, got {split}")
    return {"seen": list(split["seen"]), "unseen": list(split["unseen"])}


_SPLIT_STREAMS = {"train": 0, "val": 1, "unlabeled": 2}


def _tight_box(mask: np.ndarray) -> list[int]:
    """Tight box of a (H, W) bool mask as [x, y, w, h] pixels."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _categories() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(instance categories: things only, panoptic categories: things then stuff), ids from 1."""
    things = [
        {"id": i + 1, "name": source.name, "supercategory": "object", "picture": source.picture}
        for i, source in enumerate(THING_SOURCES)
    ]
    stuff = [
        {"id": len(things) + i + 1, "name": name, "supercategory": "texture" if name != "other" else "other"}
        for i, name in enumerate(EMBEDDED_STUFF_CLASSES)
    ]
    panoptic = [dict(c, isthing=1) for c in things] + [dict(c, isthing=0) for c in stuff]
    palette = np.random.default_rng(12345).integers(40, 256, size=(len(panoptic), 3))  # for visualisation only
    for category in panoptic:
        category["color"] = palette[category["id"] - 1].tolist()
    return things, panoptic


def _write_labelled(
    composite: Composite, image_id: int, stem: str, png_dir: Path, next_ann_id: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write the panoptic PNG; return (COCO instance annotations, panoptic annotation)."""
    height, width = composite.stuff.shape
    segment_ids = np.zeros((height, width), dtype=np.int32)  # 0 = void
    instances, segments = [], []
    for k, instance in enumerate(composite.instances):
        rle = mask_utils.encode(np.asfortranarray(instance.mask, dtype=np.uint8))
        rle["counts"] = rle["counts"].decode("ascii")
        box, area = _tight_box(instance.mask), int(instance.mask.sum())
        category_id = instance.class_index + 1
        instances.append({"id": next_ann_id + k, "image_id": image_id, "category_id": category_id, "bbox": box,
                          "area": area, "iscrowd": 0, "segmentation": rle})  # fmt: skip
        segments.append({"id": k + 1, "category_id": category_id, "area": area, "bbox": box, "iscrowd": 0})
        segment_ids[instance.mask] = k + 1
    for index in np.unique(composite.stuff[composite.stuff >= 0]).tolist():
        mask = composite.stuff == index
        segment_id = len(segments) + 1
        segments.append({"id": segment_id, "category_id": len(EMBEDDED_THING_CLASSES) + index + 1,
                         "area": int(mask.sum()), "bbox": _tight_box(mask), "iscrowd": 0})  # fmt: skip
        segment_ids[mask] = segment_id
    rgb = np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 65536], axis=2).astype(np.uint8)
    Image.fromarray(rgb).save(png_dir / f"{stem}.png")
    return instances, {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments}


def _image_sizes(rng: np.random.Generator, image_size: tuple[int, int]) -> tuple[int, int]:
    low, high = image_size
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def _generate_split(
    split: str, count: int, seed: int, image_size: tuple[int, int], assets: Assets, root: Path, progress: Any,
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE, max_objects: int = DEFAULT_MAX_OBJECTS,
) -> dict[str, int]:
    """Write one split's images (and annotations unless unlabelled) under ``root``; return its counts."""
    (root / split).mkdir()
    labelled = split != "unlabeled"
    if labelled:
        png_dir = root / "annotations" / f"panoptic_{split}"
        png_dir.mkdir()
    images, instances, panoptic = [], [], []
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], index])
        height, width = _image_sizes(rng, image_size)
        composite = compose(rng, assets, height, width, object_size, max_objects)
        stem = f"{index:06d}"
        Image.fromarray(composite.image).save(root / split / f"{stem}.jpg", quality=95)
        if labelled:
            images.append({"id": index + 1, "file_name": f"{stem}.jpg", "width": width, "height": height})
            annotations, segments = _write_labelled(composite, index + 1, stem, png_dir, len(instances) + 1)
            instances.extend(annotations)
            panoptic.append(segments)
        progress.update(1)
    if not labelled:
        return {"images": count}
    things, panoptic_categories = _categories()
    info = {"description": "updetr embedded benchmark", "version": str(FORMAT_VERSION)}
    for name, annotations, categories in (
        (f"instances_{split}.json", instances, things),
        (f"panoptic_{split}.json", panoptic, panoptic_categories),
    ):
        data = {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        with open(root / "annotations" / name, "w") as f:
            json.dump(data, f)
    return {"images": count, "annotations": len(instances)}


def _validate_object_size(object_size: Any) -> tuple[float, float]:
    values = tuple(object_size) if isinstance(object_size, (tuple, list)) else ()
    if (len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or not 0.0 <= values[0] <= values[1] <= 1.0 or values[1] <= 0.0):
        raise ValueError(f"object_size must be (smallest, largest) fractions with 0 <= smallest <= largest <= 1, "
                         f"got {object_size!r}")
    return float(values[0]), float(values[1])


def _validate(
    seed: int, num_train: int, num_val: int, num_unlabeled: int, image_size: tuple[int, int]
) -> tuple[int, int]:
    def is_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("num_unlabeled", num_unlabeled, 0)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    sides = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(sides) != 2 or not all(is_int(v) for v in sides) or not 32 <= sides[0] <= sides[1] <= 2048:
        raise ValueError(
            f"image_size must be (min_side, max_side) ints with 32 <= min_side <= max_side <= 2048, got {image_size!r}"
        )
    return int(sides[0]), int(sides[1])


def generate_embedded(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 200,
    num_unlabeled: int = 1600,
    image_size: tuple[int, int] = (128, 192),
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate the embedded benchmark into ``out_dir`` (layout in the module docstring) and return its path.

    ``image_size`` is (min_side, max_side): each image's height and width are drawn independently from it.
    ``object_size`` is the (smallest, largest) object side as fractions of the image's shorter side; sides
    are drawn log-uniformly between them and never below 12 pixels. Each image draws 1 to ``max_objects``
    objects (before occluded ones are dropped).
    If ``out_dir/meta.json`` records the same arguments the folder is reused as is. A folder holding anything
    else raises ``FileExistsError`` unless ``overwrite``. The dataset is written into a temporary sibling folder
    and renamed at the end, so an interrupted run never leaves a half-written dataset behind.
    """
    image_size = _validate(seed, num_train, num_val, num_unlabeled, image_size)
    object_size = _validate_object_size(object_size)
    if not isinstance(max_objects, (int, np.integer)) or isinstance(max_objects, bool) or not 1 <= max_objects <= 64:
        raise ValueError(f"max_objects must be an int from 1 to 64, got {max_objects!r}")
    out_dir = Path(out_dir)
    arguments = {"seed": int(seed), "num_train": int(num_train), "num_val": int(num_val),
                 "num_unlabeled": int(num_unlabeled), "image_size": list(image_size)}  # fmt: skip
    if object_size != DEFAULT_OBJECT_SIZE:
        arguments["object_size"] = list(object_size)
    if max_objects != DEFAULT_MAX_OBJECTS:
        arguments["max_objects"] = int(max_objects)
    if _reusable(out_dir, arguments, overwrite):
        logger.info("reusing the embedded benchmark in %s", out_dir)
        return out_dir

    assets = load_assets()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_benchmark(staging, arguments, assets, seed, (num_train, num_val, num_unlabeled), image_size,
                         object_size, int(max_objects), progress)
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, retired)
            shutil.rmtree(retired)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _reusable(out_dir: Path, arguments: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``out_dir`` holds the benchmark of ``arguments`` already (same format version).

    Raises:
        FileExistsError: ``out_dir`` is a file, or a folder holding anything else, and not ``overwrite``.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if not (out_dir.exists() and any(out_dir.iterdir())):
        return False
    try:
        existing = json.loads((out_dir / "meta.json").read_text())
    except (OSError, ValueError):
        existing = None
    same = (
        isinstance(existing, dict)
        and existing.get("format_version") == FORMAT_VERSION
        and existing.get("arguments") == arguments
    )
    if same:
        return True
    if not overwrite:
        if isinstance(existing, dict):
            held = (f"a different configuration {existing.get('arguments')} "
                    f"(format {existing.get('format_version')})")  # fmt: skip
        else:
            held = "something other than an embedded benchmark (no readable meta.json)"
        raise FileExistsError(f"{out_dir} holds {held}, not the requested {arguments} (format {FORMAT_VERSION});"
                              " pass overwrite=True or choose another folder")  # fmt: skip
    return False


def _write_benchmark(staging: Path, arguments: dict[str, Any], assets: Assets, seed: int, counts: tuple[int, int, int],
                     image_size: tuple[int, int], object_size: tuple[float, float], max_objects: int,
                     progress: bool) -> None:
    """Write the whole benchmark into the fresh folder ``staging``: the (train, val, unlabeled) splits of
    ``counts`` images, the one-shot split, and ``meta.json`` last (it marks the folder complete)."""
    (staging / "annotations").mkdir(parents=True)
    written = {}
    with tqdm(total=sum(counts), desc="embedded benchmark", disable=not progress) as bar:
        for split, count in zip(("train", "val", "unlabeled"), counts):
            written[split] = _generate_split(split, count, seed, image_size, assets, staging, bar, object_size,
                                             max_objects)
    unseen = list(ONESHOT_UNSEEN)
    split = {"seen": [name for name in EMBEDDED_THING_CLASSES if name not in unseen], "unseen": unseen}
    (staging / "oneshot_split.json").write_text(json.dumps(split, indent=1) + "\n")
    meta = {"format_version": FORMAT_VERSION, "arguments": arguments, "counts": written,
            "thing_classes": list(EMBEDDED_THING_CLASSES), "stuff_classes": list(EMBEDDED_STUFF_CLASSES),
            "photos": assets.photo_names, "textures": list(STUFF_TINTS),
            "thing_pictures": {source.name: source.picture for source in THING_SOURCES}}  # fmt: skip
    (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # written last: marks completion
