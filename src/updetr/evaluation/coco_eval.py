"""COCO-style box AP with pycocotools, accumulated per process and gathered across ranks."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

__all__ = ["CocoEvaluator", "METRIC_NAMES"]

logger = logging.getLogger(__name__)

# The first six entries of COCOeval.stats, in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class CocoEvaluator:
    """Box AP of detections against a COCO ground truth.

    Args:
        coco_gt: the ground truth (a ``pycocotools.coco.COCO``; VOC goes through the same
            format).
        category_ids: ``category_ids[label]`` is the dataset category id of the
            contiguous class index ``label`` the model predicts.
        class_agnostic: count every class as one (pycocotools' ``useCats = 0``): the AP of
            the boxes alone, whatever label they carry. It separates finding objects from
            naming them, e.g. to see whether a detector's weak AP is localisation or
            classification.

    Use: ``update`` after every batch, ``synchronize`` once (all ranks), ``summarize``.
    Only the images passed to ``update`` are evaluated (``params.imgIds``), so a partial
    pass over the dataset (e.g. ``max_steps_per_epoch``) gives the AP of those images.
    """

    def __init__(self, coco_gt: COCO, category_ids: list[int], *, class_agnostic: bool = False) -> None:
        self.coco_gt = coco_gt
        self.class_agnostic = class_agnostic
        self.category_ids = list(category_ids)
        known = set(coco_gt.getCatIds())
        unknown = [c for c in self.category_ids if c not in known]
        if unknown:
            raise ValueError(f"category ids {unknown} are not in the ground truth's categories")
        # image id -> (K, 7) float64 rows [image_id, x, y, w, h, score, category_id]
        self._results: dict[int, np.ndarray] = {}
        self._coco_eval: COCOeval | None = None
        self.summary_text = ""

    @property
    def image_ids(self) -> list[int]:
        return sorted(self._results)

    def update(self, image_ids: list[int], detections: list[dict[str, Tensor]]) -> None:
        """Add the detections of some images (``postprocess_detections`` output: ``scores``
        (K,), ``labels`` (K,) contiguous index, ``boxes_xyxy`` (K, 4) xyxy pixels of the
        original image). An image seen again replaces its earlier detections."""
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detection dicts")
        lookup = np.asarray(self.category_ids, dtype=np.float64)
        for image_id, det in zip(image_ids, detections):
            image_id = int(image_id.item() if isinstance(image_id, Tensor) else image_id)
            boxes = det["boxes_xyxy"].detach().cpu().double().numpy().reshape(-1, 4)  # pixels
            scores = det["scores"].detach().cpu().double().numpy().reshape(-1)
            labels = det["labels"].detach().cpu().numpy().reshape(-1).astype(np.int64)
            if labels.size and (labels.min() < 0 or labels.max() >= len(lookup)):
                raise ValueError(f"labels must be in [0, {len(lookup)}), got {labels.min()}..{labels.max()}")
            rows = np.empty((len(scores), 7), dtype=np.float64)
            rows[:, 0] = image_id
            rows[:, 1:3] = boxes[:, :2]
            rows[:, 3:5] = boxes[:, 2:] - boxes[:, :2]  # xyxy -> xywh
            rows[:, 5] = scores
            rows[:, 6] = lookup[labels]
            self._results[image_id] = rows
        self._coco_eval = None

    def synchronize(self) -> None:
        """Gather every rank's results (all ranks must call it); a no-op without
        ``torch.distributed``. Images evaluated on several ranks (a padded
        ``DistributedSampler``) count once."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[dict[int, np.ndarray] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._results)
        merged: dict[int, np.ndarray] = {}
        for part in gathered:
            for image_id, rows in (part or {}).items():
                merged.setdefault(image_id, rows)
        self._results = merged
        self._coco_eval = None

    def _evaluate(self) -> COCOeval | None:
        """Run COCOeval on the images seen; None when there is no detection at all."""
        if self._coco_eval is not None:
            return self._coco_eval
        rows = [r for r in self._results.values() if len(r)]
        if not rows:
            return None
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            coco_dt = self.coco_gt.loadRes(np.concatenate(rows))
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = self.image_ids
            coco_eval.params.useCats = 0 if self.class_agnostic else 1
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self.summary_text = buffer.getvalue()
        logger.debug("pycocotools output:\n%s", self.summary_text)
        self._coco_eval = coco_eval
        return coco_eval

    def summarize(self) -> dict[str, float]:
        """AP, AP50, AP75, APs, APm, APl in percent (0-100).

        All zeros when there is no detection at all. A metric pycocotools cannot define
        (no ground truth in that area range among the images seen: its -1) is NaN.
        """
        coco_eval = self._evaluate()
        if coco_eval is None:
            return {name: 0.0 for name in METRIC_NAMES}
        return {
            name: float(value) * 100.0 if value >= 0 else float("nan")
            for name, value in zip(METRIC_NAMES, coco_eval.stats[: len(METRIC_NAMES)])
        }

    def per_class_ap(self, iou_threshold: float | None = 0.5) -> dict[str, float]:
        """Category name -> AP in percent at one IoU threshold (None: averaged over
        0.50:0.95), area "all", 100 detections. NaN for a category with no ground truth
        among the images seen; all zeros without detections."""
        if self.class_agnostic:
            raise ValueError("per-class AP needs the classes: this evaluator counts every class as one (class_agnostic)")
        names = {c: self.coco_gt.loadCats(c)[0]["name"] for c in self.category_ids}
        coco_eval = self._evaluate()
        if coco_eval is None:
            return {names[c]: 0.0 for c in self.category_ids}
        params = coco_eval.params
        precision = coco_eval.eval["precision"]  # (T, R, K, A, M)
        if iou_threshold is not None:
            matches = np.nonzero(np.isclose(params.iouThrs, iou_threshold))[0]
            if matches.size == 0:
                raise ValueError(f"iou_threshold={iou_threshold} is not one of {params.iouThrs.tolist()}")
            precision = precision[matches]
        area = params.areaRngLbl.index("all")
        out = {}
        for cat_id in self.category_ids:
            k = params.catIds.index(cat_id)
            values = precision[:, :, k, area, -1]
            valid = values[values > -1]
            out[names[cat_id]] = float(valid.mean()) * 100.0 if valid.size else float("nan")
        return out
