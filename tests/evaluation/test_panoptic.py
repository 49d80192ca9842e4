"""PQ / SQ / RQ on hand-built segmentations (``updetr.evaluation.panoptic``), segmentation AP, and PQ 100 for
post-processed oracle masks on the embedded benchmark."""

import math

import numpy as np
import pytest
import torch

from updetr.evaluation.panoptic import PanopticQualityEvaluator, SegmentationAPEvaluator, pq_image_stats
from updetr.evaluation.panoptic_postprocess import postprocess_panoptic
from updetr.structures import DetectionOutput

# category 1, 2: things; 3: stuff
CATEGORIES = [
    {"id": 1, "name": "cat", "isthing": 1},
    {"id": 2, "name": "dog", "isthing": 1},
    {"id": 3, "name": "grass", "isthing": 0},
]


def rows(spec: dict[int, tuple[int, int]], shape=(10, 10)) -> np.ndarray:
    """Id map whose rows [a, b) hold segment id k, for every k: (a, b) in ``spec``; the rest void."""
    ids = np.zeros(shape, dtype=np.int64)
    for k, (a, b) in spec.items():
        ids[a:b] = k
    return ids


def segs(*pairs, crowd=()):
    return [{"id": i, "category_id": c, "iscrowd": int(i in crowd)} for i, c in pairs]


def evaluate(gt_ids, gt_segments, pred_ids, pred_segments):
    ev = PanopticQualityEvaluator(CATEGORIES)
    ev.update(1, gt_ids, gt_segments, pred_ids, pred_segments)
    return ev.summarize(), ev.per_class()


def approx(value):
    return pytest.approx(value, abs=1e-9)


# Ground truth used by most cases: a cat on rows 0-1 (20 px), a dog on row 2 (10 px), grass on rows 3-9 (70 px).
GT_IDS = rows({1: (0, 2), 2: (2, 3), 3: (3, 10)})
GT_SEGS = segs((1, 1), (2, 2), (3, 3))


def test_perfect_prediction():
    pred = rows({7: (0, 2), 8: (2, 3), 9: (3, 10)})  # other ids, same segments
    metrics, per_class = evaluate(GT_IDS, GT_SEGS, pred, segs((7, 1), (8, 2), (9, 3)))
    for name in ("PQ", "SQ", "RQ", "PQth", "SQth", "RQth", "PQst", "SQst", "RQst"):
        assert metrics[name] == approx(100.0), name
    assert per_class["cat"]["TP"] == 1 and per_class["grass"]["FP"] == 0


def test_one_missed_segment():
    # the cat prediction also takes 5 px of the dog (IoU 20/25 = 0.8); the rest of the dog is void: dog is a FN
    pred = rows({1: (0, 2), 3: (3, 10)})
    pred[2, :5] = 1
    metrics, per_class = evaluate(GT_IDS, GT_SEGS, pred, segs((1, 1), (3, 3)))
    # cat: PQ = SQ = 80, RQ = 100; dog: 0, 0, 0 (FN); grass: 100
    assert per_class["cat"]["PQ"] == approx(80.0) and per_class["cat"]["RQ"] == approx(100.0)
    assert per_class["dog"]["FN"] == 1 and per_class["dog"]["PQ"] == approx(0.0)
    assert metrics["PQ"] == approx(60.0)
    assert metrics["SQ"] == approx(60.0)
    assert metrics["RQ"] == approx(200 / 3)
    assert metrics["PQth"] == approx(40.0) and metrics["SQth"] == approx(40.0) and metrics["RQth"] == approx(50.0)
    assert metrics["PQst"] == approx(100.0)


def test_one_false_segment():
    gt = rows({1: (0, 2), 3: (2, 10)})  # cat 20 px, grass 80 px
    pred = rows({1: (0, 2), 2: (2, 3), 3: (3, 10)})  # a dog hallucinated on row 2; grass 70 px
    metrics, per_class = evaluate(gt, segs((1, 1), (3, 3)), pred, segs((1, 1), (2, 2), (3, 3)))
    assert per_class["dog"]["FP"] == 1
    assert per_class["grass"]["PQ"] == approx(87.5)  # IoU 70 / 80
    assert metrics["PQ"] == approx((100 + 0 + 87.5) / 3)
    assert metrics["SQ"] == approx((100 + 0 + 87.5) / 3)
    assert metrics["RQ"] == approx(200 / 3)
    assert metrics["PQth"] == approx(50.0) and metrics["RQth"] == approx(50.0)
    assert metrics["PQst"] == approx(87.5) and metrics["SQst"] == approx(87.5) and metrics["RQst"] == approx(100.0)


def test_void_pixels_leave_the_union_and_void_predictions_are_ignored():
    gt = rows({1: (0, 2), 3: (3, 10)})  # row 2 is void
    # the cat prediction spreads over the void row: |P| = 30, |P & G| = 20, |P & void| = 10 -> IoU 20 / 20 = 1
    metrics, _ = evaluate(gt, segs((1, 1), (3, 3)), rows({1: (0, 3), 3: (3, 10)}), segs((1, 1), (3, 3)))
    assert metrics["PQ"] == approx(100.0)
    # a dog predicted entirely on void is neither TP nor FP: category "dog" does not count at all
    metrics, per_class = evaluate(gt, segs((1, 1), (3, 3)), rows({1: (0, 2), 2: (2, 3), 3: (3, 10)}), segs((1, 1), (2, 2), (3, 3)))
    assert metrics["PQ"] == approx(100.0) and math.isnan(per_class["dog"]["PQ"])
    # 4 of its 10 pixels on void (<= half): a false positive
    gt2 = rows({1: (0, 2), 3: (2, 10)})
    gt2[2, :4] = 0
    metrics, per_class = evaluate(gt2, segs((1, 1), (3, 3)), rows({1: (0, 2), 2: (2, 3), 3: (3, 10)}), segs((1, 1), (2, 2), (3, 3)))
    assert per_class["dog"]["FP"] == 1
    assert per_class["grass"]["PQ"] == approx(100 * 70 / 76)  # |G| = 76, |P| = 70, inside G
    assert metrics["PQ"] == approx((100 + 0 + 100 * 70 / 76) / 3)


def test_crowd_regions_are_neither_missed_nor_false():
    gt = rows({1: (0, 2), 5: (2, 4), 3: (4, 10)})
    gt_segments = segs((1, 1), (5, 1), (3, 3), crowd=(5,))  # rows 2-3: a crowd of cats
    pred = rows({1: (0, 2), 6: (2, 4), 3: (4, 10)})  # a cat predicted on the crowd: ignored
    metrics, per_class = evaluate(gt, gt_segments, pred, segs((1, 1), (6, 1), (3, 3)))
    assert metrics["PQ"] == approx(100.0)
    assert per_class["cat"]["TP"] == 1 and per_class["cat"]["FP"] == 0 and per_class["cat"]["FN"] == 0
    # a dog on the cat crowd is a false positive (the crowd is of another category)
    metrics, per_class = evaluate(gt, gt_segments, pred, segs((1, 1), (6, 2), (3, 3)))
    assert per_class["dog"]["FP"] == 1


def test_iou_exactly_half_does_not_match():
    gt = rows({1: (0, 4), 3: (4, 10)})  # cat 40 px
    pred = rows({1: (0, 2), 3: (2, 10)})  # cat 20 px inside it: IoU 0.5
    _, per_class = evaluate(gt, segs((1, 1), (3, 3)), pred, segs((1, 1), (3, 3)))
    assert per_class["cat"]["TP"] == 0 and per_class["cat"]["FN"] == 1 and per_class["cat"]["FP"] == 1


def test_accumulates_over_images_and_counts_an_image_once():
    ev = PanopticQualityEvaluator(CATEGORIES)
    ev.update(1, GT_IDS, GT_SEGS, rows({7: (0, 2), 8: (2, 3), 9: (3, 10)}), segs((7, 1), (8, 2), (9, 3)))
    ev.update(2, GT_IDS, GT_SEGS, rows({1: (0, 2), 3: (2, 10)}), segs((1, 1), (3, 3)))  # dog missed (void in pred: no)
    ev.update(2, GT_IDS, GT_SEGS, rows({1: (0, 2), 3: (3, 10)}), segs((1, 1), (3, 3)))  # replaces the line above
    per_class = ev.per_class()
    assert per_class["dog"]["TP"] == 1 and per_class["dog"]["FN"] == 1
    assert per_class["dog"]["PQ"] == approx(100 * 1 / (1 + 0.5))
    assert ev.summarize()["PQ"] == approx((100 + 100 / 1.5 + 100) / 3)


def test_inconsistent_prediction_is_an_error():
    with pytest.raises(ValueError, match="not in segments_info"):
        pq_image_stats(GT_IDS, GT_SEGS, rows({1: (0, 10)}), [])
    with pytest.raises(ValueError, match="not dataset categories"):
        pq_image_stats(GT_IDS, GT_SEGS, rows({1: (0, 10)}), segs((1, 99)), known_categories={1, 2, 3})


# ------------------------------------------------------------------------------------ segmentation AP
def test_segmentation_ap_perfect_and_wrong_class():
    gt = rows({1: (0, 3), 2: (5, 7), 3: (7, 10)})
    gt_segments = segs((1, 1), (2, 2), (3, 3))
    masks = torch.stack([torch.from_numpy(gt == 1), torch.from_numpy(gt == 2), torch.from_numpy(gt == 3)])
    ev = SegmentationAPEvaluator(CATEGORIES, [1, 2, 3])
    ev.update(1, gt, gt_segments, {"scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 1, 2]), "masks": masks})
    assert ev.summarize()["AP_seg"] == pytest.approx(100.0)
    ev.update(1, gt, gt_segments, {"scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 0, 2]), "masks": masks})
    assert ev.summarize()["AP_seg"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------------ oracle on real data
def test_oracle_masks_on_the_embedded_benchmark_score_100(tmp_path):
    """Ground-truth masks as queries (every stuff segment split in two) -> post-processing -> PQ 100."""
    import torch.nn.functional as F

    from updetr.data.coco_panoptic import CocoPanoptic
    from updetr.data.embedded import generate_embedded

    root = generate_embedded(tmp_path / "b", num_train=1, num_val=2, num_unlabeled=0, image_size=(64, 96), progress=False)
    ds = CocoPanoptic(root / "val", root / "annotations/panoptic_val.json", root / "annotations/panoptic_val")
    ev = PanopticQualityEvaluator(ds.categories)
    for i in range(len(ds)):
        _, target = ds[i]
        h, w = target["masks"].shape[-2:]
        queries, labels = [], []
        for mask, label in zip(target["masks"].float(), target["labels"].tolist()):
            halves = [mask] if ds.isthing[label] else [F.pad(mask[:, : w // 2], (0, w - w // 2)), F.pad(mask[:, w // 2 :], (w // 2, 0))]
            queries += halves
            labels += [label] * len(halves)
        logits = torch.full((1, len(labels), len(ds.classes) + 1), -10.0)
        logits[0, torch.arange(len(labels)), torch.tensor(labels)] = 10.0
        output = DetectionOutput(logits=logits, boxes_cxcywh=torch.zeros(1, len(labels), 4), masks=20 * (torch.stack(queries)[None] - 0.5))
        size = torch.tensor([[h, w]])
        seg = postprocess_panoptic(output, size, size, isthing=ds.isthing, category_ids=ds.category_ids)[0]
        assert len(seg.segments_info) == len(target["labels"])  # stuff halves merged back
        gt = ds.ground_truth(i)
        ev.update(int(target["image_id"]), gt.segment_ids, gt.segments, seg.segment_ids, seg.segments_info)
    assert all(v == approx(100.0) for v in ev.summarize().values())
