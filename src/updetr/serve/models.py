"""The models behind the page: query patches (UP-DETR pre-training), one-shot detection, a detector.

Every answer lists *all* of the model's candidate boxes with their scores (the page filters them by its
threshold slider, so moving the slider needs no new request) and the milliseconds the model took.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..box_ops import normalized_cxcywh_to_xyxy_px
from ..data.io import DataError
from ..data.transforms import build_transforms
from ..engine.inference import load_trained
from ..query import patch_pixels
from ..structures import ImageBatch


class BoxError(ValueError):
    """A box the models cannot use (outside the image, zero or too small a size, not four numbers)."""


def check_box(box: object, width: int, height: int, min_side: int) -> tuple[float, float, float, float]:
    """``[x, y, w, h]`` in pixels of a ``width`` x ``height`` image, checked; BoxError saying what is wrong."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise BoxError("box must be [x, y, w, h] in pixels (four numbers)")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise BoxError(f"box {list(box)!r} must be four finite numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise BoxError(f"box {[x, y, w, h]} has zero size; drag to draw a box")
    if x < 0 or y < 0 or x + w > width + 0.5 or y + h > height + 0.5:
        raise BoxError(f"box {[x, y, w, h]} lies outside the {width}x{height} image")
    if w < min_side or h < min_side:
        raise BoxError(f"box {[x, y, w, h]} is smaller than the model's smallest patch side, {min_side} pixels")
    return x, y, min(w, width - x), min(h, height - y)


@dataclass
class Answer:
    """One model's answer: candidate boxes (xyxy pixels of the target image), best first, and its time."""

    model: str  # pretrain | oneshot | detector
    title: str
    candidates: list[dict] = field(default_factory=list)  # {"box_xyxy", "score", "label"}
    ms: float = 0.0

    def to_dict(self) -> dict:
        # "boxes" is the page's JSON key (static/app.js reads answer.boxes): a wire format, kept
        return {"model": self.model, "title": self.title, "boxes": self.candidates, "ms": round(self.ms, 1)}


def _boxes(xyxy: torch.Tensor, scores: torch.Tensor, labels: list[str]) -> list[dict]:
    order = scores.argsort(descending=True).tolist()
    return [{"box_xyxy": [round(float(v), 1) for v in xyxy[i]], "score": round(float(scores[i]), 4), "label": labels[i]}
            for i in order]


class ServeModels:
    """The checkpoints a page uses, loaded once; inference one request at a time (a lock), CPU by default."""

    def __init__(self, checkpoint: str | Path | None = None, oneshot: str | Path | None = None,
                 detector: str | Path | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        self.lock = threading.Lock()
        self.paths = {"pretrain": checkpoint, "oneshot": oneshot, "detector": detector}
        self.pretrain = self.oneshot = self.detector = None
        if checkpoint:
            self.pretrain = load_trained(checkpoint, self.device)
            if self.pretrain.task != "pretrain":
                raise DataError(f"{checkpoint}: is a {self.pretrain.task} checkpoint; --checkpoint takes a pre-training "
                                "one (updetr pretrain); a detector goes to --detector")
        if oneshot:
            self.oneshot = load_trained(oneshot, self.device, tasks=("oneshot",))
        if detector:
            self.detector = load_trained(detector, self.device)
            if self.detector.task != "detection":
                raise DataError(f"{detector}: is a {self.detector.task} checkpoint; --detector takes a detection one "
                                "(updetr train, or the demo's fine-tuned UP-DETR)")
        if not (self.pretrain or self.oneshot or self.detector):
            raise DataError("no model to serve: give --checkpoint, --oneshot or --detector")

    def describe(self) -> dict:
        """What the page shows about each model (file, kind, classes)."""
        info = {}
        for kind, loaded in (("pretrain", self.pretrain), ("oneshot", self.oneshot), ("detector", self.detector)):
            if loaded is not None:
                info[kind] = {"path": str(self.paths[kind]), "backbone": loaded.config.model.backbone,
                              "classes": list(loaded.classes) if kind == "detector" else None}
        return info

    @property
    def min_side(self) -> int:
        sides = [m.config.pretrain.min_patch_size for m in (self.pretrain,) if m is not None]
        sides += [m.config.oneshot.min_exemplar_size for m in (self.oneshot,) if m is not None]
        return max(sides or [1])

    def _pixels(self, config, image: Image.Image) -> ImageBatch:
        pixels, _ = build_transforms(config.data, train=False)(image, {})
        return ImageBatch.from_tensors([pixels]).to(self.device)

    @torch.inference_mode()
    def query(self, source: Image.Image, box: tuple[float, float, float, float], target: Image.Image) -> list[Answer]:
        """The drawn ``box`` of ``source`` found in ``target``: by the pre-trained model (its first query group),
        and by the one-shot model (every object of the same kind), whichever are loaded."""
        answers = []
        size_hw = torch.tensor([target.height, target.width])
        with self.lock:
            if self.pretrain is not None:
                start = time.perf_counter()
                model = self.pretrain.model
                patch = patch_pixels(source, box, self.pretrain.config.pretrain.query_size)
                out = model(self._pixels(self.pretrain.config, target), patch[None, None].to(self.device))
                scores = out.logits.softmax(-1)[0, :, 0].cpu()  # (Q/M,): the one patch's group
                xyxy = normalized_cxcywh_to_xyxy_px(out.boxes_cxcywh[0].float().cpu(), size_hw)
                answers.append(Answer("pretrain", "UP-DETR: where is this patch?",
                                      _boxes(xyxy, scores, ["patch"] * len(scores)), 1000 * (time.perf_counter() - start)))
            if self.oneshot is not None:
                start = time.perf_counter()
                patch = patch_pixels(source, box, self.oneshot.config.pretrain.query_size)
                out = self.oneshot.model(self._pixels(self.oneshot.config, target), patch[None].to(self.device))
                scores = out.logits.float().softmax(-1)[0, :, 0].cpu()  # index 0: matches the query patch
                xyxy = normalized_cxcywh_to_xyxy_px(out.boxes_cxcywh[0].float().cpu(), size_hw)
                answers.append(Answer("oneshot", "One-shot: every object of this kind",
                                      _boxes(xyxy, scores, ["same kind"] * len(scores)), 1000 * (time.perf_counter() - start)))
        return answers

    @torch.inference_mode()
    def detect(self, image: Image.Image) -> list[Answer]:
        """The detector's candidates: each query's most likely class (no-object aside) and its probability."""
        if self.detector is None:
            return []
        with self.lock:
            start = time.perf_counter()
            out = self.detector.model(self._pixels(self.detector.config, image))
            scores, labels = out.logits.softmax(-1)[0, :, :-1].max(-1)
            xyxy = normalized_cxcywh_to_xyxy_px(out.boxes_cxcywh[0].float().cpu(), torch.tensor([image.height, image.width]))
            names = [self.detector.classes[int(i)] for i in labels.cpu()]
            return [Answer("detector", "Detector: objects it knows", _boxes(xyxy, scores.cpu(), names),
                           1000 * (time.perf_counter() - start))]
