import math
import multiprocessing

import pytest
import torch
import torch.distributed as dist

from updetr.config import LossConfig
from updetr.losses.criterion import SetCriterion, build_criterion, num_boxes_for_loss
from updetr.losses.matcher import HungarianMatcher
from updetr.structures import DetectionOutput


def hand_giou(a_cxcywh, b_cxcywh) -> float:
    """GIoU of two cxcywh boxes, from the definition (Rezatofighi et al. 2019)."""
    def corners(box):
        cx, cy, w, h = box
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    ax0, ay0, ax1, ay1 = corners(a_cxcywh)
    bx0, by0, bx1, by1 = corners(b_cxcywh)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def log_softmax(row: list[float]) -> list[float]:
    norm = math.log(sum(math.exp(v) for v in row))
    return [v - norm for v in row]


def test_one_image_two_queries_by_hand():
    # C = 2 classes + no-object; one target of class 1; query 0 is close to it, query 1 far away.
    logits_list = [[0.2, 1.5, -0.3], [0.1, -0.4, 2.0]]
    boxes_list = [[0.45, 0.52, 0.30, 0.40], [0.85, 0.15, 0.10, 0.10]]
    target_box = [0.50, 0.50, 0.36, 0.32]
    eos_coef = 0.1
    output = DetectionOutput(logits=torch.tensor([logits_list]), boxes_cxcywh=torch.tensor([boxes_list]))
    targets = [{"boxes_cxcywh": torch.tensor([target_box]), "labels": torch.tensor([1])}]
    criterion = SetCriterion(2, HungarianMatcher(), eos_coef=eos_coef)

    losses = criterion(output, targets)

    # query 0 -> class 1 (weight 1), query 1 -> no-object (weight eos_coef); mean weighted by the weights
    expected_ce = -(log_softmax(logits_list[0])[1] + eos_coef * log_softmax(logits_list[1])[2]) / (1 + eos_coef)
    expected_l1 = sum(abs(p - t) for p, t in zip(boxes_list[0], target_box))  # / num_boxes = 1
    expected_giou = 1 - hand_giou(boxes_list[0], target_box)
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(expected_l1, rel=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(expected_giou, rel=1e-6)
    assert losses["loss"].item() == pytest.approx(expected_ce + 5 * expected_l1 + 2 * expected_giou, rel=1e-6)
    assert losses["class_error"].item() == 0.0  # query 0's argmax is class 1
    assert "loss_feature" not in losses
    assert torch.equal(criterion.empty_weight, torch.tensor([1.0, 1.0, eos_coef]))

    wrong = [{"boxes_cxcywh": torch.tensor([target_box]), "labels": torch.tensor([0])}]
    assert criterion(output, wrong)["class_error"].item() == 100.0


def test_feature_loss_by_hand():
    # 1 image, 3 queries, 2 patches (targets); target 0 is patch 1 and target 1 is patch 0
    features = torch.tensor([[[1.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 2.0, 2.0]]])
    patch_features = torch.tensor([[[0.0, 0.0, 5.0], [1.0, 1.0, 0.0]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 2)
    targets = [{
        "boxes_cxcywh": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]),  # exactly queries 0 and 2
        "labels": torch.tensor([0, 0]),
        "patch_index": torch.tensor([1, 0]),
    }]
    output = DetectionOutput(logits=logits, boxes_cxcywh=boxes, features=features, patch_features=patch_features)

    losses = SetCriterion(1, HungarianMatcher())(output, targets)

    # query 0 <-> patch 1: |(1,0,0) - (1,1,0)/sqrt2|^2 = (1 - 1/sqrt2)^2 + 1/2
    # query 2 <-> patch 0: |(0,1,1)/sqrt2 - (0,0,1)|^2 = 1/2 + (1/sqrt2 - 1)^2
    r = 1 / math.sqrt(2)
    expected = ((1 - r) ** 2 + 0.5 + 0.5 + (r - 1) ** 2) / 2  # / num_boxes = 2
    assert losses["loss_feature"].item() == pytest.approx(expected, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)

    # without patch_index target n is patch n
    del targets[0]["patch_index"]
    # query 0 <-> patch 0: |(1,0,0) - (0,0,1)|^2 = 2; query 2 <-> patch 1: |(-1,0,1)/sqrt2|^2 = 1; (2 + 1) / 2
    losses = SetCriterion(1, HungarianMatcher())(output, targets)
    assert losses["loss_feature"].item() == pytest.approx(1.5, rel=1e-6)


def make_output(batch_size=2, num_queries=6, num_classes=3, num_aux=2, features=True, channels=5, num_patches=3):
    def layer():
        return DetectionOutput(
            logits=torch.randn(batch_size, num_queries, num_classes + 1, requires_grad=True),
            boxes_cxcywh=torch.rand(batch_size, num_queries, 4).mul(0.4).add(0.1).requires_grad_(),
            features=torch.randn(batch_size, num_queries, channels, requires_grad=True) if features else None,
        )

    output = layer()
    output.aux = [layer() for _ in range(num_aux)]
    if features:
        output.patch_features = torch.randn(batch_size, num_patches, channels, requires_grad=True)
    return output


def make_targets(counts, num_classes=3):
    return [
        {"boxes_cxcywh": torch.rand(n, 4).mul(0.4).add(0.1), "labels": torch.randint(0, num_classes, (n,))}
        for n in counts
    ]


def test_aux_layers_get_suffixed_keys_and_the_total_adds_up():
    output = make_output(num_aux=2)
    criterion = SetCriterion(3, HungarianMatcher(), loss_ce=1.0, loss_bbox=5.0, loss_giou=2.0, loss_feature=0.5)

    targets = make_targets([3, 2])
    losses = criterion(output, targets)

    terms = ["loss_ce", "loss_bbox", "loss_giou", "loss_feature"]
    expected_keys = {t + s for t in terms for s in ("", "_0", "_1")} | {"loss", "class_error"}
    assert set(losses) == expected_keys
    weights = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_feature": 0.5}
    total = sum(weights[t] * losses[t + s] for t in terms for s in ("", "_0", "_1"))
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    assert all(torch.isfinite(v) for v in losses.values())

    # aux layer i is matched and scored on its own outputs: same as scoring it as a last layer
    alone = DetectionOutput(
        logits=output.aux[1].logits, boxes_cxcywh=output.aux[1].boxes_cxcywh,
        features=output.aux[1].features, patch_features=output.patch_features,
    )
    alone_losses = criterion(alone, targets)
    for t in terms:
        assert losses[t + "_1"].item() == pytest.approx(alone_losses[t].item(), rel=1e-6)



def test_gradients_reach_logits_boxes_and_features_of_every_layer():
    output = make_output(num_aux=1)
    losses = SetCriterion(3, HungarianMatcher())(output, make_targets([3, 1]))
    losses["loss"].backward()
    for layer in [output, *output.aux]:
        for tensor in (layer.logits, layer.boxes_cxcywh, layer.features):
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    assert output.patch_features.grad is not None and output.patch_features.grad.abs().sum() > 0


def test_images_without_objects_are_valid():
    output = make_output(num_aux=1)
    losses = SetCriterion(3, HungarianMatcher())(output, make_targets([0, 0]))
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_feature"].item() == 0.0
    assert losses["class_error"].item() == 0.0
    # every query is pushed to no-object: CE is the plain mean of -log p(no-object)
    expected = -output.logits.log_softmax(-1)[..., -1].mean()
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["loss"].backward()
    assert output.logits.grad.abs().sum() > 0

    mixed = SetCriterion(3, HungarianMatcher())(make_output(num_aux=0), make_targets([0, 2]))
    assert torch.isfinite(mixed["loss"])


def test_box_losses_are_normalised_by_num_boxes_without_crowd():
    output = make_output(batch_size=2, num_aux=0, features=False)
    targets = make_targets([2, 3])
    targets[1]["iscrowd"] = torch.tensor([0, 1, 0])
    criterion = SetCriterion(3, HungarianMatcher())
    losses = criterion(output, targets)

    indices = criterion.matcher(output.logits, output.boxes_cxcywh, targets)
    assert 1 not in indices[1][1].tolist()  # the crowd target is not matched
    l1 = sum(
        (output.boxes_cxcywh[b, q] - targets[b]["boxes_cxcywh"][t]).abs().sum() for b, (q, t) in enumerate(indices)
    )
    assert num_boxes_for_loss(targets, torch.device("cpu")) == 4.0
    assert losses["loss_bbox"].item() == pytest.approx(l1.item() / 4, rel=1e-6)


def test_group_matching_is_forwarded():
    output = make_output(batch_size=1, num_queries=6, num_aux=0, num_patches=3)
    targets = make_targets([3], num_classes=1)
    criterion = SetCriterion(3, HungarianMatcher(), group_size=2)
    indices = criterion.matcher(output.logits, output.boxes_cxcywh, targets, group_size=2)
    assert torch.equal(indices[0][0] // 2, indices[0][1])
    assert torch.isfinite(criterion(output, targets)["loss"])


def test_build_criterion_from_config():
    criterion = build_criterion(LossConfig(loss_bbox=3.0, cost_giou=1.5), 4)
    assert criterion.weight_dict["loss_bbox"] == 3.0
    assert criterion.matcher.cost_giou == 1.5
    assert criterion.empty_weight.tolist() == pytest.approx([1, 1, 1, 1, 0.1])
    pretrain = build_criterion(LossConfig(eos_coef=None), 1, group_size=10, eos_coef_override=10 / 100)
    assert pretrain.empty_weight[-1].item() == pytest.approx(0.1) and pretrain.group_size == 10
    with pytest.raises(ValueError, match="eos_coef"):
        build_criterion(LossConfig(eos_coef=None), 1)


def _num_boxes_worker(rank: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        targets = make_targets([3] if rank == 0 else [0, 1])  # 3 boxes on rank 0, 1 on rank 1
        queue.put((rank, num_boxes_for_loss(targets, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_averaged_over_processes(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_num_boxes_worker, args=(r, str(tmp_path / "store"), queue)) for r in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert all(w.exitcode == 0 for w in workers)
    results = dict(queue.get(timeout=5) for _ in range(2))
    assert results == {0: 2.0, 1: 2.0}  # (3 + 1) / 2 processes
