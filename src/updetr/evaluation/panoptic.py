"""Panoptic quality (PQ / SQ / RQ) and segmentation AP; the predictions they score come from
``updetr.evaluation.panoptic_postprocess``.

PQ follows the COCO panoptic evaluation (``panopticapi/evaluation.py``, Kirillov et al. 2019)
exactly, per image:

- a predicted and a ground-truth segment of the same category match when
  ``IoU = |P ∩ G| / (|P| + |G| - |P ∩ G| - |P ∩ void|) > 0.5`` (the predicted segment's
  void pixels are left out of the union); matches are unique because IoU > 0.5;
- crowd ground-truth segments are never matched and never count as false negatives;
- an unmatched predicted segment is a false positive unless more than half of it lies on
  void or on the crowd region of its own category;
- per category ``PQ = Σ IoU / (TP + FP/2 + FN/2)``, ``SQ = Σ IoU / TP``, ``RQ = TP / (TP +
  FP/2 + FN/2)``; the totals average over the categories with ``TP + FP + FN > 0`` (all,
  things, stuff).

Segment areas are counted in the PNGs (equal to the JSON ``area`` in a valid file).
Segmentation AP (``AP_seg``, as DETR reports it next to PQ) is pycocotools' COCOeval with
``iouType="segm"`` over the *thing* categories: every ground-truth thing segment is an
instance (crowd ones as crowd), and every query whose best class is a thing is a detection
(mask = sigmoid > 0.5 at the original size, score = class probability: ``instance_predictions``).
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from updetr.coco_json import coco_from_dict

__all__ = ["PANOPTIC_METRICS", "PanopticQualityEvaluator", "SegmentationAPEvaluator", "pq_image_stats"]

# The paper's Table 4 columns, in order (percent).
PANOPTIC_METRICS = ("PQ", "SQ", "RQ", "PQth", "SQth", "RQth", "PQst", "SQst", "RQst", "AP_seg")
_OFFSET = 1 << 32  # pairs (gt id, pred id) are encoded as gt * OFFSET + pred


# ----------------------------------------------------------------------------------------- PQ
def _as_numpy(ids: Tensor | np.ndarray) -> np.ndarray:
    return ids.cpu().numpy().astype(np.int64) if isinstance(ids, Tensor) else np.asarray(ids, dtype=np.int64)


def pq_image_stats(
    gt_ids: np.ndarray, gt_segments: list[dict[str, Any]], pred_ids: np.ndarray, pred_segments: list[dict[str, Any]],
    known_categories: set[int] | None = None,
) -> dict[int, list[float]]:
    """COCO panoptic matching of one image: category id -> [tp, fp, fn, iou_sum].

    ``*_ids`` (H, W) segment ids (0 = void); ``*_segments`` dicts with ``id`` and
    ``category_id`` (ground truth also ``iscrowd``). Raises ValueError when a prediction's
    PNG and segment list disagree or a predicted category is unknown.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"prediction is {pred_ids.shape} but the ground truth is {gt_ids.shape}")
    gt = {int(s["id"]): s for s in gt_segments}
    pred = {int(s["id"]): s for s in pred_segments}
    pred_area = {int(i): int(n) for i, n in zip(*np.unique(pred_ids, return_counts=True))}
    gt_area = {int(i): int(n) for i, n in zip(*np.unique(gt_ids, return_counts=True))}
    _check_prediction(pred, pred_area, known_categories)
    pairs, counts = np.unique(gt_ids.astype(np.int64) * _OFFSET + pred_ids.astype(np.int64), return_counts=True)
    intersection = {(int(p // _OFFSET), int(p % _OFFSET)): int(c) for p, c in zip(pairs, counts)}
    stats: dict[int, list[float]] = {}
    gt_matched, pred_matched = _match(gt, pred, gt_area, pred_area, intersection, stats)
    _count_unmatched(gt, pred, pred_area, intersection, gt_matched, pred_matched, stats)
    return stats


def _check_prediction(pred: dict[int, dict[str, Any]], pred_area: dict[int, int],
                      known_categories: set[int] | None) -> None:
    """The predicted id map and segment list name the same segments (none of them 0), of known categories."""
    if 0 in pred:
        raise ValueError("predicted segments_info lists segment id 0, which means void")
    stray = sorted(int(i) for i in pred_area if i != 0 and i not in pred)
    absent = sorted(i for i in pred if i not in pred_area)
    if stray or absent:
        raise ValueError(f"predicted segment ids {stray} are in the id map but not in segments_info; {absent} the reverse")
    if known_categories is not None:
        unknown = sorted({int(s["category_id"]) for s in pred.values()} - known_categories)
        if unknown:
            raise ValueError(f"predicted category ids {unknown} are not dataset categories")


def _stat(stats: dict[int, list[float]], category: int) -> list[float]:
    """The [tp, fp, fn, iou_sum] entry of ``category``, created at zero."""
    return stats.setdefault(int(category), [0, 0, 0, 0.0])


def _match(gt: dict[int, dict[str, Any]], pred: dict[int, dict[str, Any]], gt_area: dict[int, int],
           pred_area: dict[int, int], intersection: dict[tuple[int, int], int],
           stats: dict[int, list[float]]) -> tuple[set[int], set[int]]:
    """Count the true positives (same category, IoU > 0.5, crowd never matched) into ``stats``; returns the
    matched (ground-truth, predicted) segment ids."""
    gt_matched, pred_matched = set(), set()
    for (g, p), inter in intersection.items():
        if g not in gt or p not in pred or gt[g].get("iscrowd", 0) == 1:
            continue
        if gt[g]["category_id"] != pred[p]["category_id"]:
            continue
        union = pred_area[p] + gt_area[g] - inter - intersection.get((0, p), 0)
        iou = inter / union
        if iou > 0.5:
            s = _stat(stats, gt[g]["category_id"])
            s[0] += 1
            s[3] += iou
            gt_matched.add(g)
            pred_matched.add(p)
    return gt_matched, pred_matched


def _count_unmatched(gt: dict[int, dict[str, Any]], pred: dict[int, dict[str, Any]], pred_area: dict[int, int],
                     intersection: dict[tuple[int, int], int], gt_matched: set[int], pred_matched: set[int],
                     stats: dict[int, list[float]]) -> None:
    """Count the false negatives (unmatched non-crowd ground truth) and the false positives (unmatched
    predictions, unless more than half of one lies on void or on its category's crowd region) into ``stats``."""
    crowd_of_category = {}
    for g, segment in gt.items():
        if g in gt_matched:
            continue
        if segment.get("iscrowd", 0) == 1:
            crowd_of_category[segment["category_id"]] = g
            continue
        _stat(stats, segment["category_id"])[2] += 1
    for p, segment in pred.items():
        if p in pred_matched:
            continue
        ignored = intersection.get((0, p), 0)
        if segment["category_id"] in crowd_of_category:
            ignored += intersection.get((crowd_of_category[segment["category_id"]], p), 0)
        if ignored / pred_area[p] > 0.5:
            continue
        _stat(stats, segment["category_id"])[1] += 1


class PanopticQualityEvaluator:
    """PQ / SQ / RQ of panoptic predictions against COCO panoptic ground truth.

    Args:
        categories: dicts with ``id``, ``name`` and ``isthing`` (the dataset's categories).

    ``update`` per image, ``synchronize`` once on every rank, then ``summarize`` /
    ``per_class``. An image seen twice counts once (its last update).
    """

    def __init__(self, categories: list[dict[str, Any]]) -> None:
        self.categories = {int(c["id"]): c for c in categories}
        self._images: dict[int, dict[int, list[float]]] = {}

    def update(
        self, image_id: int, gt_ids: Tensor | np.ndarray, gt_segments: list[dict[str, Any]],
        pred_ids: Tensor | np.ndarray, pred_segments: list[dict[str, Any]],
    ) -> None:
        self._images[int(image_id)] = pq_image_stats(
            _as_numpy(gt_ids), gt_segments, _as_numpy(pred_ids), pred_segments, set(self.categories)
        )

    def synchronize(self) -> None:
        self._images = _gather_dict(self._images)

    def _totals(self) -> dict[int, list[float]]:
        totals = {c: [0, 0, 0, 0.0] for c in self.categories}
        for stats in self._images.values():
            for c, s in stats.items():
                totals[c] = [a + b for a, b in zip(totals[c], s)]
        return totals

    def per_class(self) -> dict[str, dict[str, float]]:
        """Category name -> PQ, SQ, RQ (percent), TP, FP, FN, isthing; NaN PQ for a category
        absent from ground truth and predictions."""
        out = {}
        for c, (tp, fp, fn, iou) in self._totals().items():
            denominator = tp + 0.5 * fp + 0.5 * fn
            info = self.categories[c]
            out[str(info["name"])] = {
                "PQ": 100 * iou / denominator if denominator else math.nan,
                "SQ": 100 * iou / tp if tp else (0.0 if denominator else math.nan),
                "RQ": 100 * tp / denominator if denominator else math.nan,
                "TP": tp, "FP": fp, "FN": fn, "isthing": bool(info["isthing"]),
            }
        return out

    def summarize(self) -> dict[str, float]:
        """PQ, SQ, RQ and the same for things (``*th``) and stuff (``*st``), percent; the
        mean over categories that occur (NaN when none does)."""
        per_class = [v for v in self.per_class().values() if not math.isnan(v["PQ"])]
        out = {}
        for suffix, keep in (("", lambda v: True), ("th", lambda v: v["isthing"]), ("st", lambda v: not v["isthing"])):
            chosen = [v for v in per_class if keep(v)]
            for name in ("PQ", "SQ", "RQ"):
                out[name + suffix] = float(np.mean([v[name] for v in chosen])) if chosen else math.nan
        return out


# ----------------------------------------------------------------------------------------- AP
class SegmentationAPEvaluator:
    """Mask AP (pycocotools, ``iouType="segm"``) over the thing categories.

    Args:
        categories: the dataset's categories (``id``, ``name``, ``isthing``); only things
            are evaluated.
        category_ids: ``category_ids[label]`` for the model's contiguous labels.
    """

    def __init__(self, categories: list[dict[str, Any]], category_ids: list[int]) -> None:
        self.things = [dict(id=int(c["id"]), name=str(c["name"])) for c in categories if c["isthing"]]
        self._thing_ids = {c["id"] for c in self.things}
        self.category_ids = list(category_ids)
        self._images: dict[int, tuple[dict, list[dict], list[dict]]] = {}

    def update(
        self, image_id: int, gt_ids: Tensor | np.ndarray, gt_segments: list[dict[str, Any]], detections: dict[str, Tensor]
    ) -> None:
        """``detections``: ``instance_predictions`` output for this image."""
        ids = _as_numpy(gt_ids)
        height, width = ids.shape
        image_id = int(image_id)
        gts = []
        for segment in gt_segments:
            if segment["category_id"] not in self._thing_ids:
                continue
            gts.append({"image_id": image_id, "category_id": int(segment["category_id"]),
                        "iscrowd": int(segment.get("iscrowd", 0)), **_rle_entry(ids == int(segment["id"]))})
        dts = []
        masks = detections["masks"].cpu().numpy()
        for score, label, mask in zip(detections["scores"].tolist(), detections["labels"].tolist(), masks):
            category = self.category_ids[int(label)]
            if category in self._thing_ids:
                dts.append({"image_id": image_id, "category_id": int(category), "score": float(score),
                            "segmentation": _rle_entry(mask)["segmentation"]})
        self._images[image_id] = ({"id": image_id, "height": height, "width": width}, gts, dts)

    def synchronize(self) -> None:
        self._images = _gather_dict(self._images)

    def summarize(self) -> dict[str, float]:
        """``AP_seg``, ``AP50_seg``, ``AP75_seg`` in percent; 0 without detections, NaN
        without thing ground truth."""
        images = [v[0] for v in self._images.values()]
        gts = [dict(g, id=k + 1) for k, g in enumerate(g for v in self._images.values() for g in v[1])]
        dts = [d for v in self._images.values() for d in v[2]]
        if not gts or not self.things:
            return {"AP_seg": math.nan, "AP50_seg": math.nan, "AP75_seg": math.nan}
        if not dts:
            return {"AP_seg": 0.0, "AP50_seg": 0.0, "AP75_seg": 0.0}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = coco_from_dict({"images": images, "annotations": gts, "categories": self.things})
            coco_dt = coco_gt.loadRes(dts)
            coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
            coco_eval.params.imgIds = sorted(self._images)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        stats = coco_eval.stats
        return {name: float(v) * 100 if v >= 0 else math.nan for name, v in zip(("AP_seg", "AP50_seg", "AP75_seg"), stats[:3])}


def _rle_entry(mask: np.ndarray) -> dict[str, Any]:
    """COCO ``segmentation`` (compressed RLE), ``area`` and ``bbox`` of a (H, W) bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    entry = {"segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}
    entry["area"] = float(mask_utils.area(rle))
    entry["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
    return entry


def _gather_dict(local: dict) -> dict:
    """Union of every rank's dict (first rank wins on duplicate keys); local without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        for key, value in (part or {}).items():
            merged.setdefault(key, value)
    return merged
