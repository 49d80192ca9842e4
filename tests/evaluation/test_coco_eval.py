import contextlib
import io
import math
import multiprocessing

import pytest
import torch
import torch.distributed as dist
from pycocotools.coco import COCO

from updetr.evaluation.coco_eval import CocoEvaluator
from updetr.evaluation.postprocess import postprocess_detections
from updetr.structures import DetectionOutput

CATEGORY_IDS = [3, 7]  # contiguous label 0 -> category 3 ("cat"), label 1 -> category 7 ("dog")


def make_coco(images: dict[int, list[tuple[list[float], int]]], size=(200, 300)) -> COCO:
    """In-memory ground truth; ``images`` maps image id -> [(xywh box, category id)]."""
    height, width = size
    annotations = []
    for image_id, objects in images.items():
        for box, category in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": box,
                "area": box[2] * box[3], "iscrowd": 0,
            })
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": height, "width": width} for i in images],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detection(boxes_xywh: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    boxes = torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    return {"boxes_xyxy": boxes, "scores": torch.tensor(scores), "labels": torch.tensor(labels, dtype=torch.int64)}


# one small (< 32^2), one medium and one large object per image
GROUND_TRUTH = {
    1: [([10.0, 20.0, 20.0, 20.0], 3), ([100.0, 50.0, 50.0, 50.0], 7)],
    2: [([20.0, 30.0, 150.0, 120.0], 7), ([200.0, 10.0, 25.0, 15.0], 3)],
}


def test_perfect_predictions_through_postprocess_give_100(capsys):
    coco = make_coco(GROUND_TRUTH)
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    height, width = 200, 300
    for image_id, objects in GROUND_TRUTH.items():
        num_queries = 5
        logits = torch.full((1, num_queries, 3), -10.0)
        logits[0, :, 2] = 10.0  # unused queries: no-object
        boxes = torch.full((1, num_queries, 4), 0.5)
        for q, (box, category) in enumerate(objects):
            x, y, w, h = box
            boxes[0, q] = torch.tensor([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height])
            logits[0, q, CATEGORY_IDS.index(category)] = 10.0
            logits[0, q, 2] = -10.0
        output = DetectionOutput(logits=logits, boxes_cxcywh=boxes)
        evaluator.update([image_id], postprocess_detections(output, torch.tensor([[height, width]])))

    metrics = evaluator.summarize()

    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for name, value in metrics.items():
        assert value == pytest.approx(100.0), name
    assert evaluator.per_class_ap() == pytest.approx({"cat": 100.0, "dog": 100.0})
    assert capsys.readouterr().out == ""  # pycocotools' printing is captured
    assert "Average Precision" in evaluator.summary_text


def test_one_of_two_objects_found():
    # Two large objects, one detected exactly (score 0.9), the other missed. The precision/recall
    # curve has a single point: recall 1/2 at precision 1. COCO samples the interpolated precision
    # (best precision at recall >= r) at the 101 recall thresholds r = 0, 0.01, ..., 1.00:
    # r = 0.00 ... 0.50 (51 thresholds) get 1, r = 0.51 ... 1.00 (50) get 0, so
    # AP = 51 / 101 = 50.495 %, not 50 %. The box is exact, so every IoU threshold agrees:
    # AP = AP50 = AP75 = APl, and there are no small or medium objects (NaN).
    coco = make_coco({1: [([10.0, 10.0, 100.0, 100.0], 3), ([150.0, 50.0, 120.0, 100.0], 3)]})
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    evaluator.update([1], [detection([[10.0, 10.0, 100.0, 100.0]], [0.9], [0])])

    metrics = evaluator.summarize()

    for name in ("AP", "AP50", "AP75", "APl"):
        assert metrics[name] == pytest.approx(100 * 51 / 101), name
    assert math.isnan(metrics["APs"]) and math.isnan(metrics["APm"])

    # A false positive scored above the true positive: precision is 1/2 at recall 1/2
    # (and the envelope is 1/2 at every r <= 0.5), so AP50 = 0.5 * 51 / 101 = 25.2475 %.
    evaluator.update([1], [detection([[10.0, 10.0, 100.0, 100.0], [200.0, 150.0, 50.0, 40.0]], [0.9, 0.95], [0, 0])])
    assert evaluator.summarize()["AP50"] == pytest.approx(100 * 0.5 * 51 / 101)


def test_a_loose_box_counts_only_at_low_iou_thresholds():
    # IoU = (100 x 72) / (100 x 100) = 0.72: a true positive at IoU thresholds 0.50, 0.55, 0.60,
    # 0.65, 0.70 (5 of the 10) with AP 100 each, a miss at 0.75 ... 0.95 with AP 0.
    coco = make_coco({1: [([0.0, 0.0, 100.0, 100.0], 7)]})
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    evaluator.update([1], [detection([[0.0, 0.0, 100.0, 72.0]], [0.8], [1])])

    metrics = evaluator.summarize()

    assert metrics["AP50"] == pytest.approx(100.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(50.0)
    assert evaluator.per_class_ap(iou_threshold=None)["dog"] == pytest.approx(50.0)
    assert math.isnan(evaluator.per_class_ap()["cat"])  # no cat in the ground truth


def test_labels_are_mapped_to_category_ids():
    coco = make_coco({1: [([0.0, 0.0, 100.0, 100.0], 7)]})
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    evaluator.update([1], [detection([[0.0, 0.0, 100.0, 100.0]], [0.8], [0])])  # label 0 = cat: wrong class
    assert evaluator.summarize()["AP"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="labels"):
        evaluator.update([1], [detection([[0.0, 0.0, 1.0, 1.0]], [0.8], [2])])
    with pytest.raises(ValueError, match="category"):
        CocoEvaluator(coco, [3, 99])


def test_class_agnostic_counts_boxes_whatever_their_label():
    coco = make_coco(GROUND_TRUTH)
    boxes = [box for box, _ in GROUND_TRUTH[1]]
    wrong = [1, 0]  # both labels swapped: right boxes, wrong classes
    by_class, agnostic = CocoEvaluator(coco, CATEGORY_IDS), CocoEvaluator(coco, CATEGORY_IDS, class_agnostic=True)
    for evaluator in (by_class, agnostic):
        evaluator.update([1], [detection(boxes, [0.9, 0.8], wrong)])
    assert by_class.summarize()["AP"] == pytest.approx(0.0)
    assert agnostic.summarize()["AP"] == pytest.approx(100.0)
    # a miss still counts: one of the two objects found -> precision 1 at the 51 recall points 0, 0.01 .. 0.5 of 101
    half = CocoEvaluator(coco, CATEGORY_IDS, class_agnostic=True)
    half.update([1], [detection(boxes[:1], [0.9], [1])])
    assert half.summarize()["AP"] == pytest.approx(100.0 * 51 / 101)
    with pytest.raises(ValueError, match="class_agnostic"):
        agnostic.per_class_ap()


def test_only_images_seen_are_evaluated():
    coco = make_coco(GROUND_TRUTH)
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    evaluator.update([2], [detection([box for box, _ in GROUND_TRUTH[2]], [0.9, 0.8], [1, 0])])
    assert evaluator.summarize()["AP"] == pytest.approx(100.0)  # image 1's objects are not counted as missed


def test_no_detections_give_zeros(capsys):
    coco = make_coco(GROUND_TRUTH)
    zeros = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0}
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    assert evaluator.summarize() == zeros  # nothing seen at all
    evaluator.update([1, 2], [detection([], [], []), detection([], [], [])])
    assert evaluator.summarize() == zeros
    assert evaluator.per_class_ap() == {"cat": 0.0, "dog": 0.0}
    assert capsys.readouterr().out == ""


def _synchronize_worker(rank: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = CocoEvaluator(make_coco(GROUND_TRUTH), CATEGORY_IDS)
        perfect_1 = detection([box for box, _ in GROUND_TRUTH[1]], [0.9, 0.8], [0, 1])
        perfect_2 = detection([box for box, _ in GROUND_TRUTH[2]], [0.9, 0.8], [1, 0])
        if rank == 0:
            evaluator.update([1], [perfect_1])
        else:  # image 1 again, as a padded DistributedSampler would give it
            evaluator.update([2, 1], [perfect_2, perfect_1])
        evaluator.synchronize()
        queue.put((rank, evaluator.image_ids, evaluator.summarize()["AP"]))
    finally:
        dist.destroy_process_group()


def test_synchronize_gathers_every_rank(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_synchronize_worker, args=(r, str(tmp_path / "store"), queue)) for r in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert all(w.exitcode == 0 for w in workers)
    results = sorted(queue.get(timeout=5) for _ in range(2))
    assert [r[:2] for r in results] == [(0, [1, 2]), (1, [1, 2])]
    assert all(r[2] == pytest.approx(100.0) for r in results)
