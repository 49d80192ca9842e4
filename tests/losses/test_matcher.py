import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from updetr.losses.matcher import HungarianMatcher


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) valid normalised cxcywh boxes."""
    centers = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
    sizes = 0.05 + 0.3 * torch.rand(n, 2, generator=generator)
    return torch.cat([centers, sizes], dim=1)


def random_target(n: int, num_classes: int, generator: torch.Generator, crowd: list[int] | None = None) -> dict:
    target = {
        "boxes_cxcywh": random_boxes(n, generator),
        "labels": torch.randint(0, num_classes, (n,), generator=generator),
    }
    if crowd is not None:
        target["iscrowd"] = torch.tensor(crowd, dtype=torch.int64)
    return target


def reference_cost(logits, boxes, target, weights=(1.0, 5.0, 2.0)) -> torch.Tensor:
    """(Q, N) DETR matching cost of one image, written out independently of the matcher."""
    prob = logits.softmax(-1)
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    target_xyxy = box_convert(target["boxes_cxcywh"], "cxcywh", "xyxy")
    l1 = (boxes[:, None, :] - target["boxes_cxcywh"][None, :, :]).abs().sum(-1)
    giou = generalized_box_iou(xyxy, target_xyxy)
    return -weights[0] * prob[:, target["labels"]] + weights[1] * l1 - weights[2] * giou


def brute_force_min(cost: torch.Tensor) -> float:
    num_queries, num_targets = cost.shape
    if num_targets <= num_queries:
        return min(
            sum(cost[q, n].item() for n, q in enumerate(queries))
            for queries in itertools.permutations(range(num_queries), num_targets)
        )
    return min(
        sum(cost[q, n].item() for q, n in enumerate(chosen))
        for chosen in itertools.permutations(range(num_targets), num_queries)
    )


@pytest.mark.parametrize("seed", range(6))
def test_matching_is_optimal_against_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    num_classes = 3
    sizes = [(5, 3), (6, 4), (4, 4), (6, 2), (3, 5), (5, 1)][seed]  # (Q, N), one with N > Q
    num_queries, num_targets = sizes
    logits = torch.randn(1, num_queries, num_classes + 1, generator=generator) * 3
    boxes = random_boxes(num_queries, generator)[None]
    target = random_target(num_targets, num_classes, generator)
    weights = [(1.0, 5.0, 2.0), (2.0, 1.0, 0.5)][seed % 2]

    (queries, target_ids), = HungarianMatcher(*weights)(logits, boxes, [target])

    assert queries.dtype == torch.int64 and target_ids.dtype == torch.int64
    assert len(queries) == min(num_queries, num_targets)
    assert torch.equal(queries, queries.sort().values)
    assert len(set(queries.tolist())) == len(queries) and len(set(target_ids.tolist())) == len(target_ids)
    cost = reference_cost(logits[0], boxes[0], target, weights)
    assert cost[queries, target_ids].sum().item() == pytest.approx(brute_force_min(cost), abs=1e-5)


def test_matching_is_invariant_to_batch_composition():
    generator = torch.Generator().manual_seed(1)
    num_queries, num_classes = 8, 4
    logits = torch.randn(3, num_queries, num_classes + 1, generator=generator)
    boxes = torch.stack([random_boxes(num_queries, generator) for _ in range(3)])
    targets = [random_target(n, num_classes, generator) for n in (3, 0, 5)]
    matcher = HungarianMatcher()

    batched = matcher(logits, boxes, targets)
    for b in range(3):
        (alone_q, alone_t), = matcher(logits[b : b + 1], boxes[b : b + 1], [targets[b]])
        assert torch.equal(batched[b][0], alone_q)
        assert torch.equal(batched[b][1], alone_t)
    # reordering the batch reorders the result
    reordered = matcher(logits.flip(0), boxes.flip(0), targets[::-1])
    for b in range(3):
        assert torch.equal(reordered[2 - b][0], batched[b][0])
        assert torch.equal(reordered[2 - b][1], batched[b][1])


def test_empty_targets_give_empty_indices():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 3, generator=generator)
    boxes = torch.stack([random_boxes(5, generator) for _ in range(2)])
    empty = {"boxes_cxcywh": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    matcher = HungarianMatcher()

    one_empty = [empty, random_target(2, 2, generator)]
    for result in (matcher(logits, boxes, [empty, empty]), matcher(logits, boxes, one_empty)):
        queries, target_ids = result[0]
        assert queries.numel() == 0 and target_ids.numel() == 0
        assert queries.dtype == torch.int64 and target_ids.dtype == torch.int64
    assert len(result[1][0]) == 2


def test_crowd_targets_are_never_matched_and_indices_are_original():
    generator = torch.Generator().manual_seed(3)
    num_queries = 6
    logits = torch.randn(1, num_queries, 3, generator=generator)
    boxes = random_boxes(num_queries, generator)[None]
    target = random_target(4, 2, generator, crowd=[0, 1, 0, 1])
    # a crowd target sitting exactly on a confident prediction would be the cheapest match
    target["boxes_cxcywh"][1] = boxes[0, 0]

    (queries, target_ids), = HungarianMatcher()(logits, boxes, [target])

    assert sorted(target_ids.tolist()) == [0, 2]
    # same assignment as matching the non-crowd targets alone, mapped back to the original indices
    kept = {"boxes_cxcywh": target["boxes_cxcywh"][[0, 2]], "labels": target["labels"][[0, 2]]}
    (alone_q, alone_t), = HungarianMatcher()(logits, boxes, [kept])
    assert torch.equal(queries, alone_q)
    assert torch.equal(target_ids, torch.tensor([0, 2])[alone_t])
    # only crowd targets: nothing to match
    all_crowd = random_target(2, 2, generator, crowd=[1, 1])
    (queries, target_ids), = HungarianMatcher()(logits, boxes, [all_crowd])
    assert queries.numel() == 0 and target_ids.numel() == 0


def test_group_matching_stays_inside_each_group():
    generator = torch.Generator().manual_seed(4)
    group_size, num_patches = 3, 3
    num_queries = group_size * num_patches
    logits = torch.randn(1, num_queries, 3, generator=generator)
    boxes = random_boxes(num_queries, generator)[None]
    target = random_target(num_patches, 2, generator)
    # every target's best query lies in the LAST group: global matching would leave groups 0 and 1 empty
    boxes[0, 6:9] = target["boxes_cxcywh"]
    matcher = HungarianMatcher()

    global_queries, _ = matcher(logits, boxes, [target])[0]
    assert set(global_queries.tolist()) == {6, 7, 8}

    (queries, target_ids), = matcher(logits, boxes, [target], group_size=group_size)
    assert torch.equal(queries, queries.sort().values)
    assert torch.equal(queries // group_size, target_ids)
    cost = reference_cost(logits[0], boxes[0], target)
    for q, n in zip(queries.tolist(), target_ids.tolist()):
        group = slice(n * group_size, (n + 1) * group_size)
        assert q == n * group_size + cost[group, n].argmin().item()
    assert queries[2].item() == 8  # target 2's own box is query 8, in its own group


def test_group_matching_follows_patch_index_and_skips_missing_patches():
    generator = torch.Generator().manual_seed(5)
    group_size = 2
    logits = torch.randn(1, 8, 2, generator=generator)
    boxes = random_boxes(8, generator)[None]
    target = random_target(2, 1, generator)
    target["patch_index"] = torch.tensor([3, 1])  # target 0 is patch 3, target 1 is patch 1

    (queries, target_ids), = HungarianMatcher()(logits, boxes, [target], group_size=group_size)

    assert target_ids.tolist() == [1, 0]
    assert (queries // group_size).tolist() == [1, 3]


def test_group_matching_rejects_bad_group_size():
    logits = torch.randn(1, 6, 2)
    boxes = torch.full((1, 6, 4), 0.5)
    target = {"boxes_cxcywh": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match="group_size"):
        HungarianMatcher()(logits, boxes, [target], group_size=4)


def test_nan_costs_raise_a_clear_error():
    logits = torch.randn(1, 4, 3)
    boxes = torch.full((1, 4, 4), 0.5)
    boxes[0, 1, 0] = float("nan")
    target = {"boxes_cxcywh": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match="NaN"):
        HungarianMatcher()(logits, boxes, [target])


def test_out_of_range_labels_raise():
    logits = torch.randn(1, 4, 3)  # C = 2
    boxes = torch.full((1, 4, 4), 0.5)
    target = {"boxes_cxcywh": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([2])}  # the no-object index
    with pytest.raises(ValueError, match="labels"):
        HungarianMatcher()(logits, boxes, [target])
