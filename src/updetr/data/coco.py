"""COCO-format detection datasets.

:class:`CocoStyleDataset` holds a COCO-format annotation dict (as ``pycocotools`` reads it),
validates it once at construction and serves ``(image, Target)`` pairs; :class:`CocoDetection`
reads that dict from a COCO JSON file, ``updetr.data.voc.VOCDetection`` builds it from
Pascal VOC XML.

Raw targets (before the transforms) hold ``boxes_xyxy``, pixels of the original
image; labels are contiguous class indices ``[0, C)`` with ``C = len(dataset.classes)``
(``dataset.category_ids[label]`` is the id in the annotation file).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from updetr.coco_json import coco_from_dict
from updetr.data.coco_files import image_paths_inside, is_number, read_coco_json
from updetr.data.io import DataError, load_annotated_image
from updetr.structures import Target

__all__ = ["CocoStyleDataset", "CocoDetection", "coco_from_dict"]

logger = logging.getLogger(__name__)

Transforms = Callable[[Image.Image, Target], tuple[Any, Target]]

# Box coordinates may exceed the image by this much (float rounding in COCO files)
# before the box counts as "clipped"; boxes are clipped either way.
_CLIP_TOLERANCE_PX = 0.01


class CocoStyleDataset(Dataset):
    """Detection dataset over a COCO-format annotation dict, validated at construction.

    Attributes:
        classes: category names, in ascending category-id order (``C = len(classes)``).
        category_ids: ``category_ids[label]`` is the annotation file's category id.
        coco: ``pycocotools.coco.COCO`` over the annotations (ground truth for evaluation).
        image_ids: image ids, in dataset order (``dataset[i]`` is ``image_ids[i]``).
        image_paths: image file of each item.
        dropped_boxes: annotations dropped because their box has zero or negative size
            (or lies entirely outside the image).
        clipped_boxes: boxes clipped to the image because they were partly outside it.
    """

    def _setup(
        self,
        data: dict[str, Any],
        image_paths: dict[int, Path],
        source: str,
        transforms: Transforms | None,
        return_masks: bool,
    ) -> None:
        """Validate ``data``, index it and check that every image file exists.

        Args:
            data: COCO-format dict with ``images``, ``annotations`` and ``categories``; missing
                ``id``/``area``/``iscrowd`` of annotations are filled in.
            image_paths: image id -> image file.
            source: name of the annotation file(s), used in every error message.
        """
        self.source = source
        self.transforms = transforms
        self.return_masks = return_masks
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids: list[int] = [int(c["id"]) for c in categories]
        self.classes: list[str] = [str(c["name"]) for c in categories]
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}

        images = {int(img["id"]): img for img in data["images"]}
        self.image_ids: list[int] = sorted(images)
        self.image_paths: list[Path] = [image_paths[i] for i in self.image_ids]
        self._sizes_hw = np.array([[images[i]["height"], images[i]["width"]] for i in self.image_ids], dtype=np.int64)
        index_of = {image_id: k for k, image_id in enumerate(self.image_ids)}

        anns = data["annotations"]
        image_index, labels, bboxes = self._parse_annotations(anns, label_of, index_of)
        self._renumber_annotation_ids(anns)
        areas, crowd = self._fill_defaults(anns, bboxes, return_masks)
        boxes_xyxy, keep = self._sanitize(bboxes, self._sizes_hw[image_index])
        self.coco = coco_from_dict(data)
        self._index_by_image(anns, np.flatnonzero(keep), image_index, boxes_xyxy, labels, areas, crowd, return_masks)
        self._check_image_files()

    def _parse_annotations(self, anns: list[dict[str, Any]], label_of: dict[int, int],
                           index_of: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(item index, contiguous label, float64 (A, 4) xywh pixel box) of every annotation; an invalid one is a
        DataError that names it."""
        n = len(anns)
        image_index = np.zeros(n, dtype=np.int64)
        labels = np.zeros(n, dtype=np.int64)
        k = -1
        try:  # fast path; on failure, _raise_invalid_annotation finds and describes the culprit
            for k, ann in enumerate(anns):
                image_index[k] = index_of[ann["image_id"]]
                labels[k] = label_of[ann["category_id"]]
            k = 0
            # dtype inferred, not forced: a string ("10", "NaN") would be parsed as a float by a
            # float64 array, while here it makes the array a string array and fails the check
            raw = np.array([ann["bbox"] for ann in anns]) if n else np.zeros((0, 4))
            if raw.dtype.kind not in "iuf" or raw.shape != (n, 4):
                raise ValueError("a bbox is not four numbers")
            bboxes = raw.astype(np.float64)  # (A, 4) xywh pixels
        except (KeyError, TypeError, ValueError):
            self._raise_invalid_annotation(anns, k, label_of, index_of)
        return image_index, labels, bboxes

    def _fill_defaults(self, anns: list[dict[str, Any]], bboxes: np.ndarray,
                       return_masks: bool) -> tuple[np.ndarray, np.ndarray]:
        """Fill in a missing ``iscrowd`` (0) and ``area`` (box w * h), in place; returns (area, crowd) per
        annotation. With ``return_masks`` every annotation needs a ``segmentation``."""
        n = len(anns)
        areas, crowd = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.int64)
        box_areas = (bboxes[:, 2] * bboxes[:, 3]).tolist()  # (A,) default area: w * h
        for k, (ann, box_area) in enumerate(zip(anns, box_areas)):
            if return_masks and "segmentation" not in ann:
                raise DataError(f"{self.source}: annotation {ann.get('id')} has no 'segmentation' (masks were requested)")
            if "iscrowd" not in ann:
                ann["iscrowd"] = 0
            if "area" not in ann:
                ann["area"] = box_area
            areas[k], crowd[k] = ann["area"], bool(ann["iscrowd"])
        return areas, crowd

    def _index_by_image(self, anns: list[dict[str, Any]], kept: np.ndarray, image_index: np.ndarray,
                        boxes_xyxy: np.ndarray, labels: np.ndarray, areas: np.ndarray, crowd: np.ndarray,
                        return_masks: bool) -> None:
        """Store the ``kept`` annotations grouped by item (stable), with ``_offsets``: item i owns
        ``[_offsets[i], _offsets[i + 1])``."""
        order = kept[np.argsort(image_index[kept], kind="stable")]  # annotations grouped by image
        self._boxes = boxes_xyxy[order].astype(np.float32)  # (A', 4) xyxy pixels
        self._labels = labels[order]
        self._area = areas[order]
        self._iscrowd = crowd[order]
        self._segmentations = [anns[k]["segmentation"] for k in order.tolist()] if return_masks else []
        counts = np.bincount(image_index[order], minlength=len(self.image_ids))
        self._offsets = np.concatenate([[0], np.cumsum(counts)])  # item i owns [off[i], off[i+1])

    def _check_image_files(self) -> None:
        missing = [str(p) for p in self.image_paths if not os.path.exists(p)]
        if missing:
            raise DataError(
                f"{self.source}: {len(missing)} of {len(self.image_paths)} image files are missing, "
                f"e.g. {', '.join(missing[:5])}"
            )

    def _renumber_annotation_ids(self, anns: list[dict[str, Any]]) -> None:
        """Give every annotation a unique positive integer ``id``, in place.

        pycocotools tells ground-truth boxes apart by ``id`` and reads id 0 as "unmatched": with
        duplicate or zero ids, perfect detections score below AP 100. Missing ids are filled in
        silently (minimal files omit them); duplicate, zero, negative or non-integer ids are
        renumbered with one warning that counts them. Fresh ids start above the largest valid id.
        """
        seen: set[int] = set()
        missing, bad = [], []
        for k, ann in enumerate(anns):
            ann_id = ann.get("id")
            if "id" not in ann:
                missing.append(k)
            elif not (is_number(ann_id) and ann_id == int(ann_id) and ann_id > 0) or int(ann_id) in seen:
                bad.append(k)
            else:
                seen.add(int(ann_id))
        next_id = max(seen, default=0) + 1
        if bad:
            k = bad[0]
            logger.warning(
                "%s: %d annotations have an id that is duplicated, zero or not a positive integer (first: annotations[%d] "
                "with id %r); renumbered from %d, since pycocotools tells boxes apart by id and would score perfect "
                "detections below AP 100", self.source, len(bad), k, anns[k].get("id"), next_id,
            )
        for k in sorted(missing + bad):
            anns[k]["id"] = next_id
            next_id += 1
        self.renumbered_ids = len(bad)

    def _raise_invalid_annotation(
        self, anns: list[dict[str, Any]], first: int, label_of: dict[Any, int], index_of: dict[Any, int]
    ) -> NoReturn:
        """Find the first invalid annotation from ``first`` on and raise a DataError describing it."""
        for k in range(max(first, 0), len(anns)):
            ann = anns[k]
            name = f"annotation {ann.get('id', f'#{k}')}"
            image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
            if not isinstance(image_id, (int, float)) or image_id not in index_of:
                raise DataError(f"{self.source}: {name} refers to unknown image_id {image_id!r}")
            if not isinstance(category_id, (int, float)) or category_id not in label_of:
                raise DataError(
                    f"{self.source}: {name} has category_id {category_id!r}, which is not in 'categories' "
                    f"(known ids: {self.category_ids[:20]})"
                )
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
                hint = " (the values must be JSON numbers, not strings)" if isinstance(bbox, (list, tuple)) and any(
                    isinstance(v, str) for v in bbox) else ""
                raise DataError(f"{self.source}: {name} has no valid 'bbox' [x, y, w, h] (got {bbox!r}){hint}")
        raise DataError(f"{self.source}: invalid annotations")  # not reached for real inputs

    def _sanitize(self, bboxes_xywh: np.ndarray, sizes_hw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """xywh -> xyxy clipped to the image; returns boxes (A, 4) and keep (A,); counts both."""
        x0, y0, w, h = bboxes_xywh.T
        x1, y1 = x0 + w, y0 + h
        heights, widths = sizes_hw[:, 0], sizes_hw[:, 1]
        nonfinite = ~np.isfinite(bboxes_xywh).all(axis=1)  # NaN or infinity (JSON NaN / Infinity)
        with np.errstate(invalid="ignore"):
            degenerate = nonfinite | (w <= 0) | (h <= 0)
            t = _CLIP_TOLERANCE_PX
            outside = (x0 < -t) | (y0 < -t) | (x1 > widths + t) | (y1 > heights + t)
            boxes = np.stack(
                [np.clip(x0, 0, widths), np.clip(y0, 0, heights), np.clip(x1, 0, widths), np.clip(y1, 0, heights)], axis=1
            )  # (A, 4) xyxy
            empty = ~((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        keep = ~degenerate & ~empty
        self.dropped_boxes = int((~keep).sum())
        self.nonfinite_boxes = int(nonfinite.sum())
        self.clipped_boxes = int((keep & outside).sum())
        if self.dropped_boxes or self.clipped_boxes:
            parts = []
            if self.nonfinite_boxes:
                parts.append(f"{self.nonfinite_boxes} with non-finite coordinates (NaN or infinity; first: "
                             f"annotations[{int(np.flatnonzero(nonfinite)[0])}])")
            if (degenerate & ~nonfinite).sum():
                parts.append(f"{int((degenerate & ~nonfinite).sum())} of zero or negative size")
            if (~degenerate & empty).sum():
                parts.append(f"{int((~degenerate & empty).sum())} entirely outside the image")
            logger.warning(
                "%s: dropped %d annotations whose box is unusable (%s); clipped %d boxes partly outside the image",
                self.source, self.dropped_boxes, ", ".join(parts) or "none", self.clipped_boxes,
            )
        return boxes, keep

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_check_items(self) -> list[tuple[Path, tuple[int, int]]]:
        """``(image file, annotated (h, w))`` of every item: what the start-up check decodes
        (``updetr.engine.loop.check_images``)."""
        return [(path, (int(h), int(w))) for path, (h, w) in zip(self.image_paths, self._sizes_hw)]

    def raw_target(self, index: int) -> Target:
        """Target of item ``index`` before the transforms (``boxes_xyxy``, pixels), without masks."""
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        size = torch.as_tensor(self._sizes_hw[index], dtype=torch.int64)  # (2,) (h, w)
        return Target(
            boxes_xyxy=torch.from_numpy(self._boxes[start:stop].copy()).reshape(-1, 4),
            labels=torch.from_numpy(self._labels[start:stop].copy()),
            image_id=torch.tensor(self.image_ids[index], dtype=torch.int64),
            orig_size=size,
            size=size.clone(),
            area=torch.from_numpy(self._area[start:stop].copy()),
            iscrowd=torch.from_numpy(self._iscrowd[start:stop].copy()),
        )

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        """``(image, target)``; the image is RGB PIL unless the transforms convert it."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        height, width = (int(v) for v in self._sizes_hw[index])
        image = load_annotated_image(self.image_paths[index], (height, width))
        target = self.raw_target(index)
        if self.return_masks:
            start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
            rles = [self._to_rle(seg, height, width) for seg in self._segmentations[start:stop]]
            masks = mask_utils.decode(rles) if rles else np.zeros((height, width, 0), dtype=np.uint8)  # (H, W, N)
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))).bool()  # (N, H, W)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _to_rle(self, segmentation: Any, height: int, width: int) -> dict[str, Any]:
        """COCO polygons / uncompressed or compressed RLE -> one compressed RLE."""
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
            if not polygons:  # no usable polygon: an empty mask
                return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
            return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        if isinstance(segmentation, dict) and "counts" in segmentation:
            if isinstance(segmentation["counts"], list):  # uncompressed RLE
                return mask_utils.frPyObjects(segmentation, height, width)
            return segmentation
        raise DataError(f"{self.source}: unsupported segmentation {str(segmentation)[:80]!r}")


class CocoDetection(CocoStyleDataset):
    """A COCO detection dataset: a folder of images and a COCO ``instances`` JSON file.

    ``dataset[i]`` is ``(image, target)`` with ``target`` a :class:`~updetr.structures.Target`:
    ``boxes_xyxy`` float (N, 4) pixels (converted from COCO ``xywh``; boxes partly outside
    the image clipped, boxes of zero or negative size dropped), ``labels`` int64 (N,)
    contiguous indices into ``classes``, ``area`` and ``iscrowd`` from the file (crowd
    regions kept, with ``iscrowd=1``), ``image_id``, ``orig_size``/``size`` (h, w). With
    ``return_masks`` also ``masks`` bool (N, H, W) decoded from ``segmentation``. Images
    without annotations give empty (0, 4) boxes. ``transforms(image, target)`` is applied
    last (see ``updetr.data.transforms``).

    Raises:
        DataError: the JSON is missing, malformed or inconsistent (unknown category or image
            id, bad bbox), or image files are missing; the message names the file.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms: Transforms | None = None,
        *,
        return_masks: bool = False,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        source = str(self.annotation_file)
        data = read_coco_json(self.annotation_file)
        if not self.images_dir.is_dir():
            raise DataError(f"{source}: images folder {self.images_dir} does not exist")
        paths = image_paths_inside(self.images_dir, data["images"], source)
        self._setup(data, paths, source, transforms, return_masks)
        logger.info(
            "%s: %d images, %d boxes, %d classes", source, len(self), len(self._boxes), len(self.classes)
        )
