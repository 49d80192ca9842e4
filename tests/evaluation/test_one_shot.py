"""One-shot AP50: exact VOC-style AP against hand-computed values, averaging over draws and classes."""

import math

import pytest
import torch

from updetr.evaluation.one_shot import OneShotEvaluator, average_precision, format_table3


def box(x, y, s=10.0):
    return [x, y, x + s, y + s]


# Two images, three boxes. Detections by decreasing score:
#   0.9 TP (img 1, box A)   0.8 FP (nothing there)   0.7 TP (img 2)
#   0.6 FP (duplicate of A) 0.5 TP (img 1, box B)
GT = {1: (torch.tensor([box(0, 0), box(50, 50)]), torch.tensor([False, False])),
      2: (torch.tensor([box(20, 20)]), torch.tensor([False]))}
DETS = {1: (torch.tensor([0.9, 0.8, 0.6, 0.5]), torch.tensor([box(1, 0), box(80, 80), box(0, 1), box(50, 51)])),
        2: (torch.tensor([0.7]), torch.tensor([box(20, 21)]))}
# precision / recall after each: 1/1 @ 1/3, 1/2 @ 1/3, 2/3 @ 2/3, 2/4 @ 2/3, 3/5 @ 1
AP_VOC07 = (4 * 1.0 + 3 * (2 / 3) + 4 * 0.6) / 11  # recall thresholds 0-0.3 | 0.4-0.6 | 0.7-1.0
AP_AREA = (1 / 3) * 1.0 + (1 / 3) * (2 / 3) + (1 / 3) * 0.6


def test_ap50_matches_hand_computation():
    assert average_precision(DETS, GT, method="voc07") == pytest.approx(AP_VOC07, abs=1e-12)
    assert average_precision(DETS, GT, method="voc") == pytest.approx(AP_AREA, abs=1e-12)
    assert AP_VOC07 == pytest.approx(0.763636, abs=1e-6) and AP_AREA == pytest.approx(34 / 45)


def test_iou_threshold_ignored_boxes_and_edge_cases():
    # IoU(box(0,0), box(5,0)) = 50/150 < 0.5: a miss
    assert average_precision({1: (torch.tensor([1.0]), torch.tensor([box(5, 0)]))}, {1: GT[1]}) == 0.0
    # a detection on an ignored (crowd / difficult) box is neither TP nor FP; ignored boxes are not counted
    gt = {1: (torch.tensor([box(0, 0), box(50, 50)]), torch.tensor([False, True]))}
    dets = {1: (torch.tensor([0.9, 0.8]), torch.tensor([box(50, 50), box(0, 0)]))}
    assert average_precision(dets, gt, method="voc") == pytest.approx(1.0)
    assert math.isnan(average_precision(dets, {1: (torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool))}))
    assert average_precision({}, GT) == 0.0
    # detections in an image without boxes of the class are false positives
    with_extra = {**DETS, 3: (torch.tensor([0.95]), torch.tensor([box(0, 0)]))}
    assert average_precision(with_extra, GT, method="voc") < AP_AREA


def test_evaluator_averages_draws_then_classes_and_is_order_independent():
    names = ["cat", "dog", "cow"]
    truth = {0: GT, 2: {7: (torch.tensor([box(0, 0)]), torch.tensor([False]))}}

    def run(order):
        ev = OneShotEvaluator(names, seen_labels=[0, 1], unseen_labels=[2], ground_truth=truth, num_draws=2, method="voc")
        for draw, image_id in order:
            scores, boxes = DETS[image_id]
            if draw == 1:  # the second draw finds everything first: AP 1
                scores = torch.tensor([0.9, 0.1, 0.8, 0.95][: len(scores)]) if image_id == 1 else torch.tensor([0.99])
            ev.update(0, draw, image_id, scores, boxes)
        ev.update(2, 0, 7, torch.tensor([0.5]), torch.tensor([box(30, 30)]))  # cow: miss on draw 0
        ev.update(2, 1, 7, torch.tensor([0.5]), torch.tensor([box(0, 0)]))  # hit on draw 1
        return ev.summarize()

    result = run([(0, 1), (0, 2), (1, 1), (1, 2)])
    # draw 1 by score: img2 0.99, B 0.95, A 0.9 (3 TP, recall 1 at precision 1), then dup 0.8, far 0.1: AP 1
    assert result.per_draw["cat"] == pytest.approx([100 * AP_AREA, 100.0])
    assert result.per_class["cat"] == pytest.approx((100 * AP_AREA + 100) / 2)
    assert result.per_class["cow"] == pytest.approx(50.0) and math.isnan(result.per_class["dog"])
    assert result.seen_ap50 == pytest.approx(result.per_class["cat"])  # dog (no instance) left out of the mean
    assert result.unseen_ap50 == pytest.approx(50.0)
    assert result.num_images == {"cat": 2, "dog": 0, "cow": 1}
    again = run([(1, 2), (0, 2), (1, 1), (0, 1)])
    assert repr(again.per_draw) == repr(result.per_draw)
    metrics = result.metrics()
    assert metrics["AP50_unseen"] == 50.0 and "AP50/cat" in metrics
    table = format_table3({"mine": result})
    assert "| UP-DETR (paper, VOC) | 69.0 | 73.1 |" in table and "| **mine** |" in table and "| cow* | 50.0 | 1 |" in table


def test_partial_pass_counts_only_images_seen():
    ev = OneShotEvaluator(["cat"], [0], [], {0: GT}, num_draws=1)
    ev.update(0, 0, 2, *DETS[2])  # only image 2 evaluated: its one box found
    assert ev.summarize().per_class["cat"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="draw 1"):
        ev.update(0, 1, 2, *DETS[2])
