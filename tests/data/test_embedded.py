"""The embedded benchmark (``updetr.data.embedded``): layout, determinism, COCO / COCO-panoptic validity, reuse,
the one-shot split and the generation arguments."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from updetr.data.embedded import FORMAT_VERSION, generate_embedded, load_split
from updetr.data.embedded_sources import EMBEDDED_STUFF_CLASSES, EMBEDDED_THING_CLASSES, ONESHOT_UNSEEN, THING_SOURCES

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

TINY = dict(seed=0, num_train=6, num_val=3, num_unlabeled=4, image_size=(64, 96), progress=False)
NUM_THINGS = len(EMBEDDED_THING_CLASSES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_embedded(tmp_path_factory.mktemp("embedded") / "bench", **TINY)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _panoptic_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def test_layout_and_meta(dataset):
    for split, count in (("train", 6), ("val", 3), ("unlabeled", 4)):
        assert sorted(p.name for p in (dataset / split).iterdir()) == [f"{i:06d}.jpg" for i in range(count)]
    for split, count in (("train", 6), ("val", 3)):
        assert len(list((dataset / "annotations" / f"panoptic_{split}").glob("*.png"))) == count
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["arguments"] == {"seed": 0, "num_train": 6, "num_val": 3, "num_unlabeled": 4, "image_size": [64, 96]}
    assert meta["format_version"] == FORMAT_VERSION == 2 and meta["thing_classes"] == list(EMBEDDED_THING_CLASSES)
    assert meta["thing_pictures"] == {source.name: source.picture for source in THING_SOURCES}
    assert meta["counts"]["train"]["images"] == 6 and meta["counts"]["unlabeled"] == {"images": 4}
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_same_seed_same_bytes_and_different_seed_differs(dataset, tmp_path):
    again = generate_embedded(tmp_path / "again", **TINY)
    assert _files(again) == _files(dataset)
    other = _files(generate_embedded(tmp_path / "other", **{**TINY, "seed": 1}))
    reference = _files(dataset)
    assert other.keys() == reference.keys()
    assert other["train/000000.jpg"] != reference["train/000000.jpg"]
    assert other["annotations/instances_train.json"] != reference["annotations/instances_train.json"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_instances_are_valid_coco(dataset, split):
    coco = COCO(str(dataset / "annotations" / f"instances_{split}.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(EMBEDDED_THING_CLASSES)
    assert coco.getCatIds() == list(range(1, NUM_THINGS + 1))
    assert len({a["id"] for a in coco.dataset["annotations"]}) == len(coco.dataset["annotations"])
    for image in coco.dataset["images"]:
        width, height = Image.open(dataset / split / image["file_name"]).size
        assert (width, height) == (image["width"], image["height"])
        assert 64 <= width <= 96 and 64 <= height <= 96
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert 1 <= len(annotations) <= 8
        for annotation in annotations:
            assert 1 <= annotation["category_id"] <= NUM_THINGS and annotation["iscrowd"] == 0
            x, y, w, h = annotation["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= width and y + h <= height
            rle = annotation["segmentation"]
            assert isinstance(rle["counts"], str) and rle["size"] == [height, width]
            mask = coco.annToMask(annotation)
            assert annotation["area"] == mask.sum() > 0
            assert np.allclose(mask_utils.toBbox(coco.annToRLE(annotation)), annotation["bbox"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_png_matches_segments(dataset, split):
    panoptic = json.loads((dataset / "annotations" / f"panoptic_{split}.json").read_text())
    instances = COCO(str(dataset / "annotations" / f"instances_{split}.json"))
    categories = {c["id"]: c for c in panoptic["categories"]}
    assert [c["id"] for c in panoptic["categories"]] == list(range(1, NUM_THINGS + len(EMBEDDED_STUFF_CLASSES) + 1))
    assert [c["isthing"] for c in panoptic["categories"]] == [1] * NUM_THINGS + [0] * len(EMBEDDED_STUFF_CLASSES)
    assert [c["name"] for c in panoptic["categories"]] == list(EMBEDDED_THING_CLASSES + EMBEDDED_STUFF_CLASSES)
    assert len(panoptic["annotations"]) == len(panoptic["images"])
    for entry in panoptic["annotations"]:
        ids = _panoptic_ids(dataset / "annotations" / f"panoptic_{split}" / entry["file_name"])
        segments = entry["segments_info"]
        present = set(np.unique(ids).tolist()) - {0}
        assert present == {s["id"] for s in segments}
        for segment in segments:
            mask = ids == segment["id"]
            assert segment["area"] == mask.sum()
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert segment["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        stuff = [s["category_id"] for s in segments if not categories[s["category_id"]]["isthing"]]
        assert len(stuff) == len(set(stuff))  # one segment per stuff class
        # the thing segments are exactly the instance annotations, mask for mask
        things = [s for s in segments if categories[s["category_id"]]["isthing"]]
        annotations = instances.loadAnns(instances.getAnnIds(imgIds=entry["image_id"]))
        assert [s["category_id"] for s in things] == [a["category_id"] for a in annotations]
        for segment, annotation in zip(things, annotations):
            assert np.array_equal(ids == segment["id"], instances.annToMask(annotation).astype(bool))


def test_unlabeled_split_has_images_and_no_annotations(dataset):
    images = sorted((dataset / "unlabeled").glob("*.jpg"))
    assert len(images) == 4 and all(Image.open(p).mode == "RGB" for p in images)
    assert not list((dataset / "annotations").glob("*unlabeled*"))


def test_reuse_does_not_rewrite(dataset):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    assert generate_embedded(dataset, **TINY) == dataset
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before


def test_different_configuration_is_refused_unless_overwrite(dataset, tmp_path):
    with pytest.raises(FileExistsError, match="different configuration"):
        generate_embedded(dataset, **{**TINY, "num_train": 7})
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match="not an embedded benchmark|other than an embedded benchmark"):
        generate_embedded(stranger, **TINY)
    generate_embedded(stranger, **{**TINY, "num_unlabeled": 0}, overwrite=True)
    assert not (stranger / "notes.txt").exists()
    assert json.loads((stranger / "meta.json").read_text())["arguments"]["num_unlabeled"] == 0


def test_oneshot_split_is_ten_seen_and_four_unseen_thing_classes(dataset):
    split = load_split(dataset)
    assert split["unseen"] == list(ONESHOT_UNSEEN) == ["flower", "clock", "present", "horse"]
    assert split["seen"] == [name for name in EMBEDDED_THING_CLASSES if name not in ONESHOT_UNSEEN]
    assert len(split["seen"]) == 10 and len(split["unseen"]) == 4
    assert sorted(split["seen"] + split["unseen"]) == sorted(EMBEDDED_THING_CLASSES)


def test_written_boxes_are_the_tight_boxes_of_the_written_masks(dataset):
    coco = COCO(str(dataset / "annotations" / "instances_train.json"))
    assert coco.dataset["annotations"]
    for annotation in coco.dataset["annotations"]:
        mask = coco.annToMask(annotation).astype(bool)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert annotation["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]


def test_a_benchmark_of_the_older_format_is_not_reused(dataset, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(dataset, old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps(dict(meta, format_version=1)))
    with pytest.raises(FileExistsError, match="format 1"):
        generate_embedded(old, **TINY)
    assert generate_embedded(old, **TINY, overwrite=True) == old
    assert _files(old) == _files(dataset)


@pytest.mark.parametrize(
    "override",
    [
        {"seed": -1},
        {"num_train": 0},
        {"num_val": 1.5},
        {"num_unlabeled": -2},
        {"image_size": (16, 96)},
        {"image_size": (96, 64)},
        {"image_size": 128},
        {"object_size": (0.5, 0.2)},
        {"object_size": (0.1, 1.5)},
        {"object_size": 0.3},
        {"max_objects": 0},
        {"max_objects": 2.0},
    ],
)
def test_invalid_arguments_raise(tmp_path, override):
    with pytest.raises(ValueError):
        generate_embedded(tmp_path / "bad", **{**TINY, **override})
    assert not os.listdir(tmp_path)


def test_object_size_sets_the_range_of_object_sides(dataset, tmp_path):
    big = generate_embedded(tmp_path / "big", **{**TINY, "num_train": 12, "object_size": (0.3, 0.6)})
    meta = json.loads((big / "meta.json").read_text())
    assert meta["arguments"]["object_size"] == [0.3, 0.6]
    assert "object_size" not in json.loads((dataset / "meta.json").read_text())["arguments"]  # default: unchanged
    coco = COCO(str(big / "annotations" / "instances_train.json"))
    sides, longest, shorter = [], [], []
    for ann in coco.dataset["annotations"]:
        image = coco.imgs[ann["image_id"]]
        sides.append((ann["bbox"][2] * ann["bbox"][3]) ** 0.5)
        longest.append(max(ann["bbox"][2], ann["bbox"][3]))
        shorter.append(min(image["width"], image["height"]))
    sides, longest, shorter = np.array(sides), np.array(longest), np.array(shorter)
    # the drawn box's side (the geometric mean of its height and width) lies in [0.3, 0.6] x the shorter image
    # side, rounded to pixels; its aspect (the picture's own, jittered) stays within [0.4, 2.5], and cropping to
    # the matte's support or partial occlusion (tight box of the visible mask) only shrink the box
    assert np.all(sides <= 0.6 * shorter + 1)
    assert np.all(longest <= 0.6 * 2.5 ** 0.5 * shorter + 1)
    assert np.median(sides / shorter) > 0.3


def test_max_objects_caps_the_objects_per_image(dataset, tmp_path):
    few = generate_embedded(tmp_path / "few", **{**TINY, "num_train": 12, "max_objects": 2})
    assert json.loads((few / "meta.json").read_text())["arguments"]["max_objects"] == 2
    assert "max_objects" not in json.loads((dataset / "meta.json").read_text())["arguments"]  # default: unchanged
    coco = COCO(str(few / "annotations" / "instances_train.json"))
    per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert max(per_image) == 2  # capped, and the cap is reached
