"""COCO panoptic datasets: a folder of images, a panoptic JSON and a folder of PNGs.

The official layout (``panoptic_{train,val}2017.json`` + ``panoptic_{train,val}2017/*.png``)
and the embedded benchmark's (``annotations/panoptic_{train,val}.json`` +
``annotations/panoptic_{train,val}/``) are the same format:

- JSON: ``images`` (``id``, ``file_name``, ``height``, ``width``), ``annotations`` (one per
  image: ``image_id``, ``file_name`` of the PNG, ``segments_info`` = [{``id``,
  ``category_id``, ``iscrowd``, ``bbox`` xywh, ``area``}]) and ``categories`` (``id``,
  ``name``, ``isthing`` 0/1).
- PNG: RGB, segment id = R + 256 G + 256² B; 0 is void (unlabelled).

Classes are contiguous over things and stuff together, in ascending category-id order
(``dataset.category_ids[label]`` is the file's id, ``dataset.isthing[label]`` its flag).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..coco_json import coco_from_dict
from ..structures import Target
from .coco_files import image_paths_inside, is_int, read_annotation_json, validate_images
from .io import DataError, load_annotated_image, open_image

__all__ = ["CocoPanoptic", "PanopticGroundTruth", "rgb_to_id", "id_to_rgb", "read_panoptic_png"]

logger = logging.getLogger(__name__)

Transforms = Callable[[Image.Image, Target], tuple[Any, Target]]


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 COCO panoptic colours -> (H, W) int64 segment ids (R + 256 G + 256² B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) non-negative ids < 256³ -> (H, W, 3) uint8 COCO panoptic colours."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """Segment ids (H, W) int64 of a COCO panoptic PNG; DataError naming the file if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: panoptic PNG not found")
    try:
        with open_image(path) as image:  # the pixel limit is checked before decoding
            image.load()
            if image.mode != "RGB":
                raise DataError(f"{path}: panoptic PNG must be RGB (segment id = R + 256 G + 256^2 B), got mode {image.mode}")
            rgb = np.asarray(image)
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise DataError(f"{path}: cannot read panoptic PNG ({err})") from None
    return rgb_to_id(rgb)


class PanopticGroundTruth:
    """One image's panoptic annotation at its original resolution.

    Attributes:
        segment_ids: (H, W) int64; 0 = void.
        segments: the JSON ``segments_info`` entries (dicts with ``id``, ``category_id``,
            ``iscrowd``, ...), in file order.
    """

    def __init__(self, segment_ids: np.ndarray, segments: list[dict[str, Any]]) -> None:
        self.segment_ids = segment_ids
        self.segments = segments


class CocoPanoptic(Dataset):
    """COCO panoptic segmentation dataset.

    ``dataset[i]`` is ``(image, target)``; before ``transforms`` the target holds, for the
    N segments of the image in JSON order: ``boxes_xyxy`` float (N, 4) pixels (the tight box
    of the segment's pixels), ``labels`` int64 (N,) contiguous over things + stuff,
    ``iscrowd`` int64 (N,), ``area`` float (N,) pixels counted in the PNG, ``masks`` bool
    (N, H, W) (only with ``return_masks``), and ``image_id``, ``orig_size``, ``size``.

    Attributes:
        classes: category names by label; ``category_ids``: the file's ids by label;
        isthing: bool by label.
        image_ids, image_paths, png_paths: per item.

    Raises:
        DataError (naming the file): unreadable or malformed JSON, categories without
            ``isthing``, unknown category or image ids, an image without annotation, missing
            images or PNGs (at construction); a PNG whose segment ids do not match its
            ``segments_info`` (when the item is read).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        png_dir: str | os.PathLike,
        transforms: Transforms | None = None,
        *,
        return_masks: bool = True,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.png_dir = Path(png_dir)
        self.transforms = transforms
        self.return_masks = return_masks
        source = str(self.annotation_file)
        data = _read_json(self.annotation_file)

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids: list[int] = [int(c["id"]) for c in categories]
        self.classes: list[str] = [str(c["name"]) for c in categories]
        self.isthing: list[bool] = [bool(c["isthing"]) for c in categories]
        self.categories: list[dict[str, Any]] = categories
        self._label_of = {cid: i for i, cid in enumerate(self.category_ids)}

        images = {int(img["id"]): img for img in data["images"]}
        annotations = self._annotations_by_image(data["annotations"], images, source)

        self.image_ids: list[int] = sorted(images)
        image_paths = image_paths_inside(self.images_dir, list(images.values()), source)
        png_paths = image_paths_inside(self.png_dir, list(annotations.values()), source, what="panoptic PNG")
        self.image_paths: list[Path] = [image_paths[i] for i in self.image_ids]
        self.png_paths: list[Path] = [png_paths[i] for i in self.image_ids]
        self._sizes_hw = [(int(images[i]["height"]), int(images[i]["width"])) for i in self.image_ids]
        self._segments: list[list[dict[str, Any]]] = [annotations[i]["segments_info"] for i in self.image_ids]
        self._index_of = {image_id: k for k, image_id in enumerate(self.image_ids)}
        self._coco = None
        self._check_files(source)
        logger.info("%s: %d images, %d classes (%d things)", source, len(self), len(self.classes), sum(self.isthing))

    def _annotations_by_image(self, annotations: list[dict[str, Any]], images: dict[int, dict[str, Any]],
                              source: str) -> dict[int, dict[str, Any]]:
        """Image id -> its one panoptic annotation, each checked: a known image, a ``file_name``, segments with
        unique positive integer ids and known categories; every image has one."""
        by_image: dict[int, dict[str, Any]] = {}
        for k, ann in enumerate(annotations):
            image_id = ann.get("image_id")
            if image_id not in images:
                raise DataError(f"{source}: annotations[{k}] refers to unknown image_id {image_id!r}")
            if image_id in by_image:
                raise DataError(f"{source}: image {image_id} has two panoptic annotations")
            if not isinstance(ann.get("file_name"), str) or not isinstance(ann.get("segments_info"), list):
                raise DataError(f"{source}: annotations[{k}] (image {image_id}) needs 'file_name' and a 'segments_info' list")
            seen: set[int] = set()
            for segment in ann["segments_info"]:
                if not isinstance(segment, dict) or not is_int(segment.get("id")) or segment["id"] <= 0:
                    raise DataError(f"{source}: image {image_id} has a segment without a positive integer 'id': {segment!r}")
                if segment["id"] in seen:
                    raise DataError(f"{source}: image {image_id} lists segment id {segment['id']} twice")
                seen.add(segment["id"])
                if segment.get("category_id") not in self._label_of:
                    raise DataError(
                        f"{source}: image {image_id} segment {segment['id']} has category_id "
                        f"{segment.get('category_id')!r}, which is not in 'categories'"
                    )
            by_image[image_id] = ann
        without = sorted(set(images) - set(by_image))
        if without:
            raise DataError(f"{source}: {len(without)} images have no panoptic annotation, e.g. ids {without[:5]}")
        return by_image

    def _check_files(self, source: str) -> None:
        """Both folders exist and hold every image and every panoptic PNG."""
        if not self.images_dir.is_dir():
            raise DataError(f"{source}: images folder {self.images_dir} not found")
        if not self.png_dir.is_dir():
            raise DataError(f"{source}: panoptic PNG folder {self.png_dir} not found")
        for kind, paths in (("image", self.image_paths), ("panoptic PNG", self.png_paths)):
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise DataError(
                    f"{source}: {len(missing)} of {len(paths)} {kind} files are missing, e.g. {', '.join(missing[:5])}"
                )

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_check_items(self) -> list[tuple[Path, tuple[int, int]]]:
        """``(file, (h, w))`` of every image and every panoptic PNG (same size): what the start-up
        check decodes (``updetr.engine.loop.check_images``)."""
        return list(zip(self.image_paths, self._sizes_hw)) + list(zip(self.png_paths, self._sizes_hw))

    @property
    def coco(self):
        """``pycocotools`` COCO of the segments as boxes (JSON ``bbox``/``area``/``iscrowd``,
        things and stuff), the ground truth of box AP; built on first use."""
        if self._coco is None:
            annotations = []
            for image_id, segments in zip(self.image_ids, self._segments):
                for s in segments:
                    bbox = s.get("bbox")
                    if not isinstance(bbox, list) or len(bbox) != 4:
                        raise DataError(f"{self.annotation_file}: image {image_id} segment {s['id']} has no 'bbox' [x, y, w, h]")
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": image_id, "category_id": s["category_id"], "bbox": bbox,
                        "area": float(s.get("area", bbox[2] * bbox[3])), "iscrowd": int(bool(s.get("iscrowd", 0))),
                    })
            images = [{"id": i, "height": h, "width": w} for i, (h, w) in zip(self.image_ids, self._sizes_hw)]
            categories = [{"id": c["id"], "name": c["name"]} for c in self.categories]
            self._coco = coco_from_dict({"images": images, "annotations": annotations, "categories": categories})
        return self._coco

    def index_of(self, image_id: int) -> int:
        return self._index_of[int(image_id)]

    def ground_truth(self, index: int) -> PanopticGroundTruth:
        """Segment ids and ``segments_info`` of item ``index`` at the original size, checked
        against each other (DataError naming the PNG when they disagree)."""
        png = self.png_paths[index]
        ids = read_panoptic_png(png)
        if ids.shape != self._sizes_hw[index]:
            raise DataError(
                f"{png}: PNG is {ids.shape[0]}x{ids.shape[1]} but the image is "
                f"{self._sizes_hw[index][0]}x{self._sizes_hw[index][1]} (height x width)"
            )
        segments = self._segments[index]
        in_png = set(np.unique(ids).tolist()) - {0}
        in_json = {int(s["id"]) for s in segments}
        if in_png != in_json:
            only_png, only_json = sorted(in_png - in_json), sorted(in_json - in_png)
            raise DataError(
                f"{png}: segment ids do not match {self.annotation_file.name} (image {self.image_ids[index]}): "
                f"in the PNG only {only_png[:10] or 'none'}, in segments_info only {only_json[:10] or 'none'}"
            )
        return PanopticGroundTruth(ids, segments)

    def raw_target(self, index: int) -> Target:
        """Target before the transforms (``boxes_xyxy``, pixels; masks only with ``return_masks``)."""
        gt = self.ground_truth(index)
        ids = torch.from_numpy(gt.segment_ids)
        segment_ids = torch.tensor([int(s["id"]) for s in gt.segments], dtype=torch.int64)  # (N,)
        masks = ids[None] == segment_ids[:, None, None]  # (N, H, W) bool
        size = torch.tensor(self._sizes_hw[index], dtype=torch.int64)  # (2,) (h, w)
        target = Target(
            boxes_xyxy=_mask_boxes(masks),
            labels=torch.tensor([self._label_of[s["category_id"]] for s in gt.segments], dtype=torch.int64),
            image_id=torch.tensor(self.image_ids[index], dtype=torch.int64),
            orig_size=size,
            size=size.clone(),
            area=masks.flatten(1).sum(1).float(),
            iscrowd=torch.tensor([int(bool(s.get("iscrowd", 0))) for s in gt.segments], dtype=torch.int64),
        )
        if self.return_masks:
            target["masks"] = masks
        return target

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        image = load_annotated_image(self.image_paths[index], self._sizes_hw[index])
        target = self.raw_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy pixel boxes (N, 4) of bool masks (N, H, W); x1/y1 exclusive (pixel edges)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)
    height, width = masks.shape[-2:]
    ys = torch.arange(height)
    xs = torch.arange(width)
    y0 = torch.where(rows, ys, height).min(1).values
    y1 = torch.where(rows, ys, -1).max(1).values + 1
    x0 = torch.where(cols, xs, width).min(1).values
    x1 = torch.where(cols, xs, -1).max(1).values + 1
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def _read_json(path: Path) -> dict[str, Any]:
    """Read a panoptic JSON and check its structure; DataError naming the file otherwise."""
    data = read_annotation_json(path, "panoptic annotation")
    if not data["categories"]:
        raise DataError(f"{path}: 'categories' is empty")
    ids: set[int] = set()
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not is_int(cat.get("id")) or "name" not in cat:
            raise DataError(f"{path}: categories[{k}] must be an object with an integer 'id' and a 'name'")
        if cat["id"] in ids:
            raise DataError(f"{path}: category id {cat['id']} appears twice")
        ids.add(cat["id"])
        if cat.get("isthing") not in (0, 1, True, False):
            raise DataError(
                f"{path}: category {cat['id']} ({cat['name']!r}) has no 'isthing' flag (0 or 1); a panoptic "
                "file must say which categories are things and which are stuff"
            )
    validate_images(path, data["images"], is_int)
    return data
