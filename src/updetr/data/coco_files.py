"""COCO-style annotation files (detection and panoptic): reading and structurally validating the JSON, and the
image paths it names, each kept inside its folder. Every error is a DataError naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

from updetr.data.io import OUTSIDE_ROOT_ENV, DataError, path_inside

__all__ = ["image_paths_inside", "is_int", "is_number", "read_annotation_json", "read_coco_json", "validate_images"]


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def image_paths_inside(images_dir: Path, images: list[dict[str, Any]], source: str, key: str = "file_name",
                       what: str = "image") -> dict[int, Path]:
    """image id -> ``images_dir / image[key]`` for every entry of ``images``, each kept inside
    ``images_dir`` (``updetr.data.io.path_inside``: no absolute path, no ``..`` above it).

    Raises:
        DataError: names how many entries lead outside the folder and the first of them.
    """
    paths, outside = {}, []
    for img in images:
        name = str(img[key])
        path = path_inside(images_dir, name)
        if path is None:
            outside.append((img.get("id", img.get("image_id")), name))
            continue
        paths[int(img["id"] if "id" in img else img["image_id"])] = path
    if outside:
        image_id, name = outside[0]
        raise DataError(
            f"{source}: {len(outside)} {what} file names lead outside the folder {images_dir} (an absolute path or "
            f"'..' above it; first: {what} {image_id} {key} {name!r}); link the files into the folder, or set "
            f"{OUTSIDE_ROOT_ENV}=1 to allow it"
        )
    return paths


def read_annotation_json(path: Path, kind: str = "annotation") -> dict[str, Any]:
    """Read a COCO-style JSON (detection or panoptic) whose top level holds the lists
    ``images``, ``annotations`` and ``categories``; DataError naming the file otherwise."""
    if not path.is_file():
        raise DataError(f"{path}: {kind} file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read {kind} file ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problem = "is missing" if key not in data else "is not a list"
            raise DataError(f"{path}: top-level key {key!r} {problem}")
    return data


def is_int(value: Any) -> bool:
    """An int, not a bool (a panoptic file's ids and sizes)."""
    return isinstance(value, int) and not isinstance(value, bool)


def validate_images(path: Path, images: list[Any], id_check: Callable[[Any], bool] = is_number) -> None:
    """Check a COCO file's ``images[]``: objects with ``id``, ``file_name``, ``height`` and ``width``, unique ids that
    pass ``id_check``, positive sizes; the first problem is a DataError naming ``path`` and the entry."""
    seen: set[Any] = set()
    for k, img in enumerate(images):
        if not isinstance(img, dict):
            raise DataError(f"{path}: images[{k}] is not an object")
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise DataError(f"{path}: images[{k}] (id={img.get('id')!r}) lacks {key!r}")
        if not id_check(img["id"]) or img["id"] in seen:
            raise DataError(f"{path}: images[{k}] has an invalid or duplicate id {img['id']!r}")
        if not (id_check(img["height"]) and id_check(img["width"]) and img["height"] > 0 and img["width"] > 0):
            raise DataError(f"{path}: image {img['id']} has invalid size {img['height']!r}x{img['width']!r}")
        seen.add(img["id"])


def read_coco_json(path: Path) -> dict[str, Any]:
    """Read and structurally validate a COCO detection annotation file (images, categories, annotations)."""
    data = read_annotation_json(path)
    validate_images(path, data["images"], is_number)
    category_ids: set[int] = set()
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise DataError(f"{path}: categories[{k}] must be an object with 'id' and 'name'")
        if not is_number(cat["id"]) or cat["id"] in category_ids:
            raise DataError(f"{path}: categories[{k}] has an invalid or duplicate id {cat['id']!r}")
        category_ids.add(cat["id"])
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{k}] is not an object")
    return data
