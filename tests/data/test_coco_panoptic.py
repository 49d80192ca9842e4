"""COCO panoptic dataset on the embedded benchmark, and its bad-input errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from updetr.config import DataConfig
from updetr.data.coco_panoptic import CocoPanoptic, id_to_rgb, read_panoptic_png, rgb_to_id
from updetr.data.embedded import generate_embedded
from updetr.data.embedded_sources import EMBEDDED_STUFF_CLASSES, EMBEDDED_THING_CLASSES
from updetr.data.io import DataError
from updetr.data.transforms import build_transforms


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return generate_embedded(tmp_path_factory.mktemp("emb") / "data", num_train=3, num_val=2, num_unlabeled=0,
                             image_size=(64, 96), progress=False)


def dataset(root, **kw) -> CocoPanoptic:
    return CocoPanoptic(root / "val", root / "annotations/panoptic_val.json", root / "annotations/panoptic_val", **kw)


def copy_split(embedded, tmp_path):
    """A writable copy of the val split (images, JSON, PNGs)."""
    root = tmp_path / "copy"
    shutil.copytree(embedded / "val", root / "val")
    shutil.copytree(embedded / "annotations/panoptic_val", root / "annotations/panoptic_val")
    shutil.copy(embedded / "annotations/panoptic_val.json", root / "annotations/panoptic_val.json")
    return root


def test_classes_things_and_stuff(embedded):
    ds = dataset(embedded)
    assert len(ds) == 2
    assert ds.classes == list(EMBEDDED_THING_CLASSES) + list(EMBEDDED_STUFF_CLASSES)
    assert ds.category_ids == list(range(1, 19))
    assert ds.isthing == [True] * 14 + [False] * 4


def test_targets_match_the_json(embedded):
    ds = dataset(embedded)
    data = json.loads((embedded / "annotations/panoptic_val.json").read_text())
    for index in range(len(ds)):
        image, target = ds[index]
        ann = next(a for a in data["annotations"] if a["image_id"] == int(target["image_id"]))
        segments = ann["segments_info"]
        n = len(segments)
        assert target["masks"].shape == (n, image.height, image.width) and target["masks"].dtype == torch.bool
        assert int(target["masks"].sum(0).max()) == 1  # segments never overlap
        assert target["labels"].tolist() == [s["category_id"] - 1 for s in segments]
        assert target["area"].tolist() == [s["area"] for s in segments]
        xywh = torch.tensor([s["bbox"] for s in segments], dtype=torch.float32)
        torch.testing.assert_close(target["boxes_xyxy"], torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
        assert target["iscrowd"].tolist() == [0] * n
        assert target["orig_size"].tolist() == [image.height, image.width]
        gt = ds.ground_truth(index)
        assert gt.segment_ids.shape == (image.height, image.width)


def test_transforms_resize_masks_with_the_image(embedded):
    cfg = DataConfig(scales=[48], max_size=200, val_size=40, crop=False, hflip=0.0)
    ds = dataset(embedded, transforms=build_transforms(cfg, train=True))
    pixels, target = ds[0]
    assert pixels.shape[-2:] == target["masks"].shape[-2:] == tuple(target["size"].tolist())
    assert min(target["size"].tolist()) == 48
    assert ((target["boxes_cxcywh"] >= 0) & (target["boxes_cxcywh"] <= 1)).all()  # normalised cxcywh
    without = dataset(embedded, transforms=build_transforms(cfg, train=False), return_masks=False)
    assert "masks" not in without[0][1]


def test_box_ground_truth_for_stage_one(embedded):
    coco = dataset(embedded).coco
    assert sorted(coco.getCatIds()) == list(range(1, 19))
    assert len(coco.getImgIds()) == 2 and len(coco.anns) > 0


def test_id_colour_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536 + 7, 256**3 - 1]])
    assert (rgb_to_id(id_to_rgb(ids)) == ids).all()


# ------------------------------------------------------------------------------------ bad input
def test_png_with_ids_not_in_the_json(embedded, tmp_path):
    root = copy_split(embedded, tmp_path)
    png = root / "annotations/panoptic_val/000000.png"
    ids = read_panoptic_png(png)
    ids[0, 0] = 77  # a segment the JSON does not list
    Image.fromarray(id_to_rgb(ids)).save(png)
    ds = dataset(root)
    with pytest.raises(DataError, match="000000.png.*in the PNG only \\[77\\]"):
        ds[0]


def test_json_segment_missing_from_the_png(embedded, tmp_path):
    root = copy_split(embedded, tmp_path)
    path = root / "annotations/panoptic_val.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["segments_info"].append({"id": 999, "category_id": 3, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1})
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="000001.png.*in segments_info only \\[999\\]"):
        dataset(root)[1]


def test_missing_png(embedded, tmp_path):
    root = copy_split(embedded, tmp_path)
    (root / "annotations/panoptic_val/000001.png").unlink()
    with pytest.raises(DataError, match="panoptic PNG files are missing.*000001.png"):
        dataset(root)


def test_categories_without_isthing(embedded, tmp_path):
    root = copy_split(embedded, tmp_path)
    path = root / "annotations/panoptic_val.json"
    data = json.loads(path.read_text())
    del data["categories"][15]["isthing"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="panoptic_val.json.*category 16 .*'isthing'"):
        dataset(root)


@pytest.mark.parametrize("problem", ["json", "category", "image", "image size"])
def test_malformed_json(embedded, tmp_path, problem):
    root = copy_split(embedded, tmp_path)
    path = root / "annotations/panoptic_val.json"
    data = json.loads(path.read_text())
    if problem == "json":
        path.write_text("{not json")
    else:
        if problem == "category":
            data["annotations"][0]["segments_info"][0]["category_id"] = 500
        elif problem == "image":
            data["annotations"][0]["image_id"] = 42
        else:  # the images[] check shared with detection files (coco_files.validate_images)
            data["images"][0]["height"] = float(data["images"][0]["height"])
        path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="panoptic_val.json"):
        dataset(root)


def test_png_of_the_wrong_size(embedded, tmp_path):
    root = copy_split(embedded, tmp_path)
    png = root / "annotations/panoptic_val/000000.png"
    ids = read_panoptic_png(png)
    Image.fromarray(id_to_rgb(ids[:-1])).save(png)
    with pytest.raises(DataError, match="000000.png: PNG is"):
        dataset(root)[0]
