"""Panoptic post-processing (``updetr.evaluation.panoptic_postprocess``): segments from class and mask logits,
stuff merged, small segments dropped, padding cropped; instances for segmentation AP."""

import numpy as np
import pytest
import torch

from updetr.evaluation.panoptic import PanopticQualityEvaluator
from updetr.evaluation.panoptic_postprocess import instance_predictions, postprocess_panoptic
from updetr.structures import DetectionOutput

# category 1, 2: things; 3: stuff
CATEGORIES = [
    {"id": 1, "name": "cat", "isthing": 1},
    {"id": 2, "name": "dog", "isthing": 1},
    {"id": 3, "name": "grass", "isthing": 0},
]


def segs(*pairs):
    return [{"id": i, "category_id": c, "iscrowd": 0} for i, c in pairs]


def pq(gt_ids, gt_segments, pred_ids, pred_segments) -> float:
    ev = PanopticQualityEvaluator(CATEGORIES)
    ev.update(1, gt_ids, gt_segments, pred_ids, pred_segments)
    return ev.summarize()["PQ"]


def make_output(class_probs: list[list[float]], masks: torch.Tensor) -> DetectionOutput:
    """Queries with the given probabilities over (cat, dog, grass, no-object) and mask logits (1, Q, h, w)."""
    logits = torch.tensor(class_probs).clamp_min(1e-6).log()[None]  # (1, Q, 4)
    return DetectionOutput(logits=logits, boxes_cxcywh=torch.full((1, len(class_probs), 4), 0.5), masks=masks)


ISTHING = [True, True, False]


CATEGORY_IDS = [1, 2, 3]


def test_postprocess_merges_stuff_and_gives_consistent_ids():
    h, w = 8, 8
    masks = torch.full((1, 4, h, w), -10.0)
    masks[0, 0, :2] = 10  # a cat on rows 0-1
    masks[0, 1, 2:, :4] = 10  # grass, left half of the rest
    masks[0, 2, 2:, 4:] = 10  # grass again, right half
    masks[0, 3] = 5  # a low-confidence query: dropped by the threshold
    probs = [[0.95, 0.02, 0.02, 0.01], [0.01, 0.01, 0.97, 0.01], [0.01, 0.01, 0.9, 0.08], [0.5, 0.1, 0.1, 0.3]]
    size = torch.tensor([[h, w]])
    result = postprocess_panoptic(make_output(probs, masks), size, size, isthing=ISTHING, category_ids=CATEGORY_IDS)[0]
    ids = result.segment_ids.numpy()
    assert len(result.segments_info) == 2  # the two grass queries are one segment
    assert sorted(s["id"] for s in result.segments_info) == [1, 2]
    assert set(np.unique(ids).tolist()) == {1, 2}  # no void: every pixel has an owner
    for s in result.segments_info:
        assert s["area"] == int((ids == s["id"]).sum())
    grass = next(s for s in result.segments_info if s["category_id"] == 3)
    assert grass["area"] == 48 and grass["bbox"] == [0, 2, 8, 6] and grass["isthing"] is False
    # merged stuff matches the single ground-truth grass segment: PQ 100
    gt = np.where(np.arange(h)[:, None] < 2, 1, 3) * np.ones((1, w), dtype=np.int64)
    assert pq(gt, segs((1, 1), (3, 3)), ids, result.segments_info) == pytest.approx(100.0, abs=1e-9)


def test_postprocess_random_outputs_are_non_overlapping_and_match_segments_info():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 4, generator=g) * 3
    masks = torch.randn(3, 10, 6, 9, generator=g) * 4
    sizes = torch.tensor([[24, 36], [20, 30], [24, 17]])
    origs = torch.tensor([[48, 70], [20, 31], [50, 33]])
    output = DetectionOutput(logits=logits, boxes_cxcywh=torch.rand(3, 10, 4), masks=masks)
    results = postprocess_panoptic(output, sizes, origs, isthing=ISTHING, category_ids=CATEGORY_IDS, threshold=0.3)
    assert any(r.segments_info for r in results)
    for r, orig in zip(results, origs.tolist()):
        ids = r.segment_ids.numpy()
        assert list(ids.shape) == orig
        listed = [s["id"] for s in r.segments_info]
        assert listed == list(range(1, len(listed) + 1))
        assert set(np.unique(ids).tolist()) - {0} == set(listed)
        if listed:
            assert (ids > 0).all()  # one owner per pixel, nothing left void
        for s in r.segments_info:
            assert s["area"] == int((ids == s["id"]).sum()) >= 5
            assert s["score"] > 0.3
        stuff = [s["category_id"] for s in r.segments_info if not s["isthing"]]
        assert len(stuff) == len(set(stuff))  # one segment per stuff class


def test_postprocess_threshold_and_small_segments():
    h, w = 8, 8
    masks = torch.full((1, 2, h, w), -10.0)
    masks[0, 0] = 10
    masks[0, 1, 0, :4] = 20  # a dog that wins only 4 pixels: dropped, its pixels go back to the cat
    probs = [[0.9, 0.05, 0.03, 0.02], [0.02, 0.9, 0.06, 0.02]]
    size = torch.tensor([[h, w]])
    result = postprocess_panoptic(make_output(probs, masks), size, size, isthing=ISTHING, category_ids=CATEGORY_IDS)[0]
    assert [s["category_id"] for s in result.segments_info] == [1] and result.segments_info[0]["area"] == 64
    empty = postprocess_panoptic(make_output(probs, masks), size, size, isthing=ISTHING, category_ids=CATEGORY_IDS,
                                 threshold=0.95)[0]
    assert empty.segments_info == [] and int(empty.segment_ids.max()) == 0


def test_postprocess_crops_the_padding_before_resizing():
    masks = torch.full((1, 1, 4, 8), -10.0)
    masks[0, 0, :, :4] = 10  # the object fills the image; the right half of the batch grid is padding
    probs = [[0.9, 0.05, 0.03, 0.02]]
    result = postprocess_panoptic(make_output(probs, masks), torch.tensor([[16, 16]]), torch.tensor([[32, 32]]),
                                  isthing=ISTHING, category_ids=CATEGORY_IDS, padded_size=(16, 32))[0]
    assert result.segments_info[0]["area"] == 32 * 32


def test_instance_predictions_shapes():
    output = DetectionOutput(logits=torch.randn(2, 5, 4), boxes_cxcywh=torch.rand(2, 5, 4), masks=torch.randn(2, 5, 4, 6))
    out = instance_predictions(output, torch.tensor([[16, 24], [12, 20]]), torch.tensor([[30, 50], [12, 20]]))
    assert out[0]["masks"].shape == (5, 30, 50) and out[1]["masks"].shape == (5, 12, 20)
    assert out[0]["masks"].dtype == torch.bool and (out[0]["labels"] < 3).all()
