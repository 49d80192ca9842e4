"""One-shot detection AP50 (CoAE's protocol, paper Table 3; docs/method.md §3).

For each class ``c`` and each query draw ``k``: the detections of every test image
containing ``c``, each made with that image's ``k``-th query patch of ``c``, are scored
against the boxes of ``c`` in those images; AP50 of ``c`` is the mean over the draws. The
table reports it per class and averaged over the seen and over the unseen classes.

AP is computed exactly as the Pascal VOC devkit does (no pycocotools): detections of all
images are sorted by score (stable, ties in image-id order); each is matched to the
ground-truth box of highest IoU in its image; IoU >= 0.5 with an unmatched box is a true
positive, with an already matched box a false positive, with an ignored box (crowd /
VOC difficult) neither. ``method="voc07"`` is the 11-point interpolated AP of VOC2007
(CoAE evaluates VOC2007 test with it), ``"voc"`` the all-point area under the monotone
precision envelope (VOC2010+). Boxes are continuous pixel coordinates (no +1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchvision.ops import box_iou

__all__ = [
    "average_precision", "interpolated_ap", "OneShotEvaluator", "OneShotResult", "PAPER_TABLE3",
    "PAPER_UNSEEN_PER_CLASS", "format_table3",
]  # fmt: skip

AP_METHODS = ("voc07", "voc")

#: Paper Table 3, AP50 (%) on VOC2007 test: (seen, unseen).
PAPER_TABLE3: dict[str, tuple[float, float]] = {
    "SiamFC": (15.1, 13.3), "SiamRPN": (9.6, 14.2), "CompNet": (52.7, 52.1), "CoAE": (60.1, 68.2),
    "Li et al.": (61.1, 69.1), "DETR": (46.2, 57.3), "UP-DETR": (69.0, 73.1),
}  # fmt: skip
#: Paper, per unseen VOC class AP50 (%).
PAPER_UNSEEN_PER_CLASS: dict[str, dict[str, float]] = {
    "DETR": {"cow": 62.7, "sheep": 55.2, "cat": 65.4, "aeroplane": 45.9},
    "UP-DETR": {"cow": 80.9, "sheep": 71.0, "cat": 80.4, "aeroplane": 59.9},
}


def interpolated_ap(recall: np.ndarray, precision: np.ndarray, method: str = "voc07") -> float:
    """AP from the (recall, precision) curve of detections sorted by decreasing score, in [0, 1]."""
    if method == "voc07":
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    if method == "voc":
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
        steps = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    raise ValueError(f"method={method!r} is not one of {', '.join(AP_METHODS)}")


def average_precision(
    detections: Mapping[int, tuple[Tensor, Tensor]],
    ground_truth: Mapping[int, tuple[Tensor, Tensor]],
    *,
    iou_threshold: float = 0.5,
    method: str = "voc07",
) -> float:
    """VOC-style AP (fraction in [0, 1]) of one class over a set of images.

    Args:
        detections: image id -> (scores (K,), boxes (K, 4) xyxy pixels).
        ground_truth: image id -> (boxes (N, 4) xyxy pixels, ignore (N,) bool). Images
            with detections but no entry count as having no box.

    Returns:
        AP, or NaN when there is no non-ignored ground-truth box.
    """
    num_gt = sum(int((~ignore.bool()).sum()) for _, ignore in ground_truth.values())
    if num_gt == 0:
        return float("nan")
    keys, scores, boxes, starts = [], [], [], {}
    for image_id in sorted(detections):
        s, b = detections[image_id]
        starts[image_id] = len(keys)
        keys.extend([image_id] * len(s))
        scores.append(s.detach().double().cpu().reshape(-1))
        boxes.append(b.detach().double().cpu().reshape(-1, 4))
    if not keys:
        return 0.0
    tp, fp = _mark_detections(detections, ground_truth, keys, starts, torch.cat(scores).numpy(), torch.cat(boxes),
                              iou_threshold)
    counted = (tp + fp) > 0
    tp, fp = np.cumsum(tp[counted]), np.cumsum(fp[counted])
    if tp.size == 0:
        return 0.0
    recall = tp / num_gt
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return interpolated_ap(recall, precision, method)


def _mark_detections(detections: Mapping[int, tuple[Tensor, Tensor]], ground_truth: Mapping[int, tuple[Tensor, Tensor]],
                     keys: list[int], starts: dict[int, int], scores_all: np.ndarray, boxes_all: Tensor,
                     iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp) 0/1 per detection in descending score order: each detection takes the ground-truth box it
    overlaps most; a first match at ``iou_threshold`` or more is a TP, a repeat or a miss an FP, an ignored
    box neither. ``keys[d]`` is detection d's image, whose detections start at ``starts[image]``."""
    order = np.argsort(-scores_all, kind="stable")
    matched = {k: np.zeros(len(gt[0]), dtype=bool) for k, gt in ground_truth.items()}
    ious = {}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, d in enumerate(order):
        image_id = keys[d]
        gt = ground_truth.get(image_id)
        if gt is None or len(gt[0]) == 0:
            fp[rank] = 1
            continue
        start = starts[image_id]
        if image_id not in ious:  # (K_image, N), all detections of this image at once
            ious[image_id] = box_iou(boxes_all[start : start + len(detections[image_id][0])], gt[0].double())
        overlaps = ious[image_id][d - start]  # (N,)
        j = int(overlaps.argmax())
        if float(overlaps[j]) >= iou_threshold:
            if bool(gt[1][j]):
                continue  # matched an ignored box: neither TP nor FP
            if not matched[image_id][j]:
                matched[image_id][j] = True
                tp[rank] = 1
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    return tp, fp


@dataclass
class OneShotResult:
    """AP50 in percent. ``per_class``: mean over the draws (NaN: no test instance);
    ``per_draw``: one value per draw; ``num_images``: test images evaluated per class."""

    seen: list[str]
    unseen: list[str]
    per_class: dict[str, float]
    per_draw: dict[str, list[float]]
    num_images: dict[str, int]
    num_draws: int
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    def mean(self, names: Sequence[str]) -> float:
        values = [self.per_class[n] for n in names if not math.isnan(self.per_class.get(n, math.nan))]
        return float(np.mean(values)) if values else float("nan")

    @property
    def seen_ap50(self) -> float:
        return self.mean(self.seen)

    @property
    def unseen_ap50(self) -> float:
        return self.mean(self.unseen)

    def metrics(self) -> dict[str, float]:
        """Flat floats for training logs: AP50_seen, AP50_unseen, AP50 (all classes), AP50/<class>."""
        out = {"AP50_seen": self.seen_ap50, "AP50_unseen": self.unseen_ap50, "AP50": self.mean(self.seen + self.unseen)}
        out.update({f"AP50/{name}": value for name, value in self.per_class.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen_AP50": self.seen_ap50, "unseen_AP50": self.unseen_ap50, "seen": self.seen, "unseen": self.unseen,
            "per_class": self.per_class, "per_draw": self.per_draw, "num_images": self.num_images,
            "num_draws": self.num_draws, "ap_method": self.method, **self.extra,
        }  # fmt: skip


class OneShotEvaluator:
    """Collects per-episode detections and computes :class:`OneShotResult`.

    Args:
        class_names: name of every class label.
        seen_labels, unseen_labels: the evaluated labels.
        ground_truth: label -> image id -> (boxes xyxy pixels (N, 4), ignore (N,) bool).
        num_draws: query draws per episode.
        method: ``voc07`` | ``voc`` (see the module docstring).

    Only the (class, draw, image) triples passed to ``update`` count: a partial pass over
    the episodes gives the AP of the images seen.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        seen_labels: Sequence[int],
        unseen_labels: Sequence[int],
        ground_truth: Mapping[int, Mapping[int, tuple[Tensor, Tensor]]],
        num_draws: int,
        method: str = "voc07",
    ) -> None:
        if method not in AP_METHODS:
            raise ValueError(f"ap method {method!r} is not one of {', '.join(AP_METHODS)}")
        self.class_names = list(class_names)
        self.seen_labels, self.unseen_labels = list(seen_labels), list(unseen_labels)
        self.ground_truth = ground_truth
        self.num_draws = num_draws
        self.method = method
        # (label, draw) -> image id -> (scores (Q,), boxes (Q, 4) xyxy pixels)
        self._detections: dict[tuple[int, int], dict[int, tuple[Tensor, Tensor]]] = {}

    def update(self, label: int, draw: int, image_id: int, scores: Tensor, boxes_xyxy_px: Tensor) -> None:
        if not 0 <= draw < self.num_draws:
            raise ValueError(f"draw {draw} is outside [0, {self.num_draws})")
        self._detections.setdefault((int(label), int(draw)), {})[int(image_id)] = (
            scores.detach().float().cpu(), boxes_xyxy_px.detach().float().cpu(),
        )  # fmt: skip

    def synchronize(self) -> None:
        """Gather every rank's detections (all ranks must call it); no-op without torch.distributed."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._detections)
        merged: dict[tuple[int, int], dict[int, tuple[Tensor, Tensor]]] = {}
        for part in gathered:
            for key, per_image in (part or {}).items():
                for image_id, value in per_image.items():
                    merged.setdefault(key, {}).setdefault(image_id, value)
        self._detections = merged

    def summarize(self) -> OneShotResult:
        per_class, per_draw, num_images = {}, {}, {}
        for label in self.seen_labels + self.unseen_labels:
            name = self.class_names[label]
            truth = self.ground_truth.get(label, {})
            values = []
            images: set[int] = set()
            for draw in range(self.num_draws):
                detections = self._detections.get((label, draw), {})
                images |= set(detections)
                gt = {i: truth[i] for i in detections if i in truth}
                values.append(100.0 * average_precision(detections, gt, method=self.method) if gt else float("nan"))
            per_draw[name] = values
            valid = [v for v in values if not math.isnan(v)]
            per_class[name] = float(np.mean(valid)) if valid else float("nan")
            num_images[name] = len(images)
        return OneShotResult(
            seen=[self.class_names[c] for c in self.seen_labels], unseen=[self.class_names[c] for c in self.unseen_labels],
            per_class=per_class, per_draw=per_draw, num_images=num_images, num_draws=self.num_draws, method=self.method,
        )  # fmt: skip


def _fmt(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.1f}"


def format_table3(rows: Mapping[str, OneShotResult], *, title: str = "", paper: bool = True, per_class: bool = True) -> str:
    """Markdown in the form of paper Table 3: the paper's rows (reference, VOC) then ``rows``."""
    lines = [title, ""] if title else []
    lines += ["| Method | Seen AP50 | Unseen AP50 |", "|---|---|---|"]
    if paper:
        lines += [f"| {name} (paper, VOC) | {s:.1f} | {u:.1f} |" for name, (s, u) in PAPER_TABLE3.items()]
    lines += [f"| **{name}** | {_fmt(r.seen_ap50)} | {_fmt(r.unseen_ap50)} |" for name, r in rows.items()]
    if per_class and rows:
        first = next(iter(rows.values()))
        names = first.seen + first.unseen
        lines += ["", f"Per class (AP50, mean over {first.num_draws} query draws; images evaluated; * = unseen):", ""]
        lines += ["| class | " + " | ".join(rows) + " | images |", "|---" * (len(rows) + 2) + "|"]
        for n in names:
            mark = "*" if n in first.unseen else ""
            values = " | ".join(_fmt(r.per_class.get(n, math.nan)) for r in rows.values())
            lines.append(f"| {n}{mark} | {values} | {first.num_images.get(n, 0)} |")
        if paper and set(PAPER_UNSEEN_PER_CLASS["UP-DETR"]) <= set(first.unseen):
            lines += ["", "Paper, unseen VOC classes: " + "; ".join(
                f"{m}: " + ", ".join(f"{c} {v:.1f}" for c, v in d.items()) for m, d in PAPER_UNSEEN_PER_CLASS.items()
            )]  # fmt: skip
    return "\n".join(lines)
