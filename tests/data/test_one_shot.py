"""One-shot data (``updetr.data.one_shot``): the exemplar bank, CoAE training pairs and deterministic evaluation
episodes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from updetr.config import DataConfig
from updetr.data.coco import CocoDetection
from updetr.data.one_shot import ExemplarBank, OneShotEpisodes, OneShotTrainDataset, collate_one_shot
from updetr.data.one_shot_split import OneShotSplit
from updetr.data.transforms import build_transforms

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CLASSES = ["a", "b", "c", "d"]  # split: seen a, b, d; unseen c
SPLIT = OneShotSplit(seen=("a", "b", "d"), unseen=("c",))
# image id -> [(category_id, [x, y, w, h], iscrowd)]
ANNOTATIONS = {
    1: [(1, [2, 2, 20, 20], 0), (1, [25, 25, 16, 18], 0), (3, [5, 30, 12, 12], 0)],  # a, a, c
    2: [(1, [4, 4, 30, 20], 0), (1, [40, 40, 4, 4], 0), (2, [10, 26, 20, 16], 0)],  # a, tiny a, b
    3: [(2, [6, 6, 24, 24], 0), (2, [30, 30, 14, 14], 1)],  # b, crowd b
    4: [(3, [8, 8, 20, 20], 0)],  # only unseen: skipped in training
    5: [],  # no object: skipped
    6: [(4, [10, 10, 20, 20], 0)],  # d has no exemplar in another image: skipped
    7: [(2, [12, 4, 18, 30], 0), (3, [2, 2, 10, 10], 0)],  # b, c
}


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("oneshot")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for image_id, objects in ANNOTATIONS.items():
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 48, "width": 48})
        for category_id, box, crowd in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category_id, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": crowd})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return root


def dataset(root, train):
    cfg = DataConfig(scales=[48], max_size=64, val_size=48, crop=False, hflip=0.5)
    return CocoDetection(root / "images", root / "ann.json", build_transforms(cfg, train=train))


def test_exemplar_bank_skips_crowd_and_tiny_boxes(coco_dir):
    bank = ExemplarBank(dataset(coco_dir, False), [0, 1], min_size=8)
    assert bank.image_index[0].tolist() == [0, 0, 1]  # the 4x4 box of image 2 is not an exemplar
    assert bank.image_index[1].tolist() == [1, 2, 6]  # the crowd box of image 3 is not an exemplar
    patch = bank.patch(0, 0, 16)
    assert patch.shape == (3, 16, 16) and patch.dtype == torch.float32


def test_training_pairs_never_query_the_target_image_nor_unseen_classes(coco_dir):
    data = OneShotTrainDataset(dataset(coco_dir, True), SPLIT, query_size=16, min_exemplar_size=8, seed=3)
    used_ids = [data.dataset.image_ids[i] for i in data.indices]
    assert used_ids == [1, 2, 3, 7]
    assert data.skipped == {"only unseen classes": 1, "no seen-class object": 1,
                            "no exemplar of its seen classes in another image": 1}
    seen_labels = {CLASSES.index(n) for n in SPLIT.seen}
    queried = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        for item in range(len(data)):
            pixels, target, patch = data[item]
            label = int(target["query_label"])
            image_id = int(target["image_id"])
            assert label in seen_labels
            assert int(target["query_image_id"]) != image_id, "query patch cut from the target image"
            raw = data.dataset.raw_target(data.indices[item])
            assert len(target["boxes_cxcywh"]) == int((raw["labels"] == label).sum())  # only the query class's boxes
            assert (target["labels"] == 0).all() and patch.shape == (3, 16, 16)
            queried.add((image_id, label))
    assert queried == {(1, 0), (2, 0), (2, 1), (3, 1), (7, 1)}  # both classes of image 2 get drawn
    data.set_epoch(5)
    a, b = data[1], data[1]
    assert int(a[1]["query_image_id"]) == int(b[1]["query_image_id"]) and torch.equal(a[2], b[2])
    images, targets, patches = collate_one_shot([data[0], data[1]])
    assert patches.shape == (2, 3, 16, 16) and images.pixels.shape[0] == 2


def test_exclude_unseen_images(coco_dir):
    data = OneShotTrainDataset(dataset(coco_dir, True), SPLIT, query_size=16, min_exemplar_size=8,
                               exclude_unseen_images=True)
    assert [data.dataset.image_ids[i] for i in data.indices] == [2, 3]


def test_episodes_are_deterministic_and_never_use_the_target_image(coco_dir):
    test = dataset(coco_dir, False)
    labels = [0, 1, 3, 2]
    first = OneShotEpisodes(test, labels, query_size=16, min_exemplar_size=8, num_draws=5)
    again = OneShotEpisodes(dataset(coco_dir, False), labels, query_size=16, min_exemplar_size=8, num_draws=5)
    assert first.episodes == again.episodes and first.draws == again.draws
    pairs = {(test.image_ids[i], label) for i, label in first.episodes}
    # every class present in every image, except d (only one image: no exemplar elsewhere)
    assert pairs == {(1, 0), (1, 2), (2, 0), (2, 1), (3, 1), (4, 2), (7, 1), (7, 2)}
    assert first.skipped == {3: 1}
    for (index, label), draws in zip(first.episodes, first.draws):
        assert len(draws) == 5
        assert all(first.bank.image_index[label][p] != index for p in draws)
        candidates = first.bank.candidates(label, index)
        order = np.random.default_rng(test.image_ids[index]).permutation(len(candidates))
        assert draws == [int(candidates[order[k % len(order)]]) for k in range(5)]
    e = first.episodes.index((6, 1))  # image 7, class b
    pixels, target, patches = first[e]
    assert patches.shape == (5, 3, 16, 16) and target["labels"].tolist() == [0]
    boxes, ignore = first.ground_truth(e)
    assert boxes.tolist() == [[12.0, 4.0, 30.0, 34.0]] and ignore.tolist() == [False]
    torch.testing.assert_close(first[e][2], again[e][2])
