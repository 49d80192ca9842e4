import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from updetr.config import DataConfig
from updetr.data.build import build_detection_dataset
from updetr.data.coco import CocoDetection
from updetr.data.io import DataError
from updetr.data.transforms import build_transforms


def _rle(h, w, box):
    m = np.zeros((h, w), dtype=np.uint8, order="F")
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _write_coco(root, annotations=None, images=None, categories=None):
    """Three images: 40x60 (h x w), 30x50, 20x20 (the last without annotations)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = images or [
        {"id": 11, "file_name": "a.jpg", "height": 40, "width": 60},
        {"id": 7, "file_name": "sub/b.png", "height": 30, "width": 50},
        {"id": 20, "file_name": "c.jpg", "height": 20, "width": 20},
    ]
    for img in images:
        path = root / "images" / img["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (img["width"], img["height"]), (90, 90, 90)).save(path)
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 11, "category_id": 5, "bbox": [10, 5, 20, 10], "iscrowd": 0, "area": 150.0,
             "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
            {"id": 2, "image_id": 11, "category_id": 1, "bbox": [50, 30, 20, 20], "iscrowd": 0, "area": 400.0,
             "segmentation": [[50, 30, 70, 30, 70, 50, 50, 50]]},  # partly outside: clipped
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0, "area": 0.0,
             "segmentation": []},  # zero width: dropped
            {"id": 4, "image_id": 7, "category_id": 3, "bbox": [2, 3, 10, 12], "iscrowd": 1, "area": 99.0,
             "segmentation": _rle(30, 50, (2, 3, 12, 15))},
            {"id": 5, "image_id": 7, "category_id": 1, "bbox": [4, 4, -3, 5], "iscrowd": 0, "area": 1.0,
             "segmentation": []},  # negative width: dropped
        ]
    categories = categories or [{"id": 5, "name": "five"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps(data))
    return root / "images", ann_file


def test_targets(tmp_path, caplog):
    images, ann_file = _write_coco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="updetr.data.coco"):
        ds = CocoDetection(images, ann_file)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 2" in warnings[0].getMessage() and "clipped 1" in warnings[0].getMessage()
    assert ds.dropped_boxes == 2 and ds.clipped_boxes == 1
    assert ds.classes == ["one", "three", "five"] and ds.category_ids == [1, 3, 5]
    assert ds.image_ids == [7, 11, 20] and len(ds) == 3
    assert len(ds.coco.getAnnIds()) == 5  # the evaluation ground truth is the file as written

    image, t = ds[1]  # image 11
    assert isinstance(image, Image.Image) and image.size == (60, 40)
    torch.testing.assert_close(t["boxes_xyxy"], torch.tensor([[10.0, 5, 30, 15], [50, 30, 60, 40]]))
    assert t["boxes_xyxy"].dtype == torch.float32
    assert t["labels"].tolist() == [2, 0] and t["labels"].dtype == torch.int64
    assert [ds.category_ids[i] for i in t["labels"]] == [5, 1]
    assert t["area"].tolist() == [150.0, 400.0] and t["iscrowd"].tolist() == [0, 0]
    assert t["image_id"].item() == 11 and t["orig_size"].tolist() == [40, 60] and t["size"].tolist() == [40, 60]

    _, t = ds[0]  # image 7: crowd region kept
    assert t["iscrowd"].tolist() == [1] and t["labels"].tolist() == [1]
    torch.testing.assert_close(t["boxes_xyxy"], torch.tensor([[2.0, 3, 12, 15]]))

    _, t = ds[2]  # no annotations
    assert t["boxes_xyxy"].shape == (0, 4) and t["labels"].shape == (0,) and t["image_id"].item() == 20


def test_masks(tmp_path):
    images, ann_file = _write_coco(tmp_path)
    ds = CocoDetection(images, ann_file, return_masks=True)
    _, t = ds[1]
    assert t["masks"].shape == (2, 40, 60) and t["masks"].dtype == torch.bool
    ys, xs = torch.nonzero(t["masks"][0], as_tuple=True)  # polygon (10, 5)-(30, 15)
    assert abs(xs.min().item() - 10) <= 1 and abs(xs.max().item() + 1 - 30) <= 1
    assert abs(ys.min().item() - 5) <= 1 and abs(ys.max().item() + 1 - 15) <= 1
    _, t = ds[0]  # RLE
    assert t["masks"].sum().item() == 120 and t["masks"][0, 3:15, 2:12].all()
    _, t = ds[2]
    assert t["masks"].shape == (0, 20, 20)


def test_with_transforms(tmp_path):
    images, ann_file = _write_coco(tmp_path)
    cfg = DataConfig(val_size=80, max_size=200)
    ds = CocoDetection(images, ann_file, build_transforms(cfg, train=False), return_masks=True)
    pixels, t = ds[1]
    assert pixels.shape == (3, 80, 120) and t["size"].tolist() == [80, 120] and t["orig_size"].tolist() == [40, 60]
    torch.testing.assert_close(t["boxes_cxcywh"][0], torch.tensor([20 / 60, 10 / 40, 20 / 60, 10 / 40]))
    assert t["masks"].shape == (2, 80, 120)


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        CocoDetection(tmp_path, bad)
    with pytest.raises(DataError, match="missing.json: annotation file not found"):
        CocoDetection(tmp_path, tmp_path / "missing.json")


def test_missing_key_names_the_file(tmp_path):
    images, ann_file = _write_coco(tmp_path)
    data = json.loads(ann_file.read_text())
    del data["categories"]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match="annotations.json: top-level key 'categories' is missing"):
        CocoDetection(images, ann_file)
    data = json.loads(ann_file.read_text())
    data["categories"] = [{"id": 1, "name": "one"}]
    del data["images"][0]["height"]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match="annotations.json: images\\[0\\].*lacks 'height'"):
        CocoDetection(images, ann_file)


def test_unknown_category(tmp_path):
    images, ann_file = _write_coco(
        tmp_path, annotations=[{"id": 1, "image_id": 11, "category_id": 42, "bbox": [1, 1, 5, 5]}]
    )
    with pytest.raises(DataError, match="annotations.json.*category_id 42"):
        CocoDetection(images, ann_file)


def test_missing_image_file(tmp_path):
    images, ann_file = _write_coco(tmp_path)
    (images / "sub" / "b.png").unlink()
    with pytest.raises(DataError, match="1 of 3 image files are missing.*sub/b.png"):
        CocoDetection(images, ann_file)


def test_image_size_disagreeing_with_annotation(tmp_path):
    images, ann_file = _write_coco(tmp_path)
    Image.new("RGB", (33, 33)).save(images / "a.jpg")
    ds = CocoDetection(images, ann_file)
    with pytest.raises(DataError, match="a.jpg: image is 33x33"):
        ds[1]


def test_defaults_filled_for_evaluation(tmp_path):
    images, ann_file = _write_coco(tmp_path, annotations=[{"image_id": 11, "category_id": 1, "bbox": [1, 2, 3, 4]}])
    ds = CocoDetection(images, ann_file)
    ann = ds.coco.loadAnns(ds.coco.getAnnIds())[0]
    assert ann["area"] == 12 and ann["iscrowd"] == 0 and ann["id"] == 1
    assert ds[1][1]["area"].tolist() == [12.0]


def test_build_detection_dataset(tmp_path):
    _write_coco(tmp_path)
    cfg = DataConfig(root=str(tmp_path), val_images="images", val_annotations="annotations.json", val_size=64)
    ds = build_detection_dataset(cfg, "val")
    pixels, t = ds[0]
    assert isinstance(ds, CocoDetection) and pixels.shape[-2] == 64 and t["size"][0].item() == 64
    train = build_detection_dataset(
        DataConfig(root=str(tmp_path), train_images="images", train_annotations="annotations.json",
                   scales=[32], max_size=64, crop_resize=[40], crop_size=[20, 30]),
        "train",
    )
    assert min(train[1][1]["size"].tolist()) == 32
    with pytest.raises(DataError, match="data.root"):
        build_detection_dataset(DataConfig(root=str(tmp_path / "nope")), "val")
    with pytest.raises(DataError, match="data.val_images"):
        build_detection_dataset(DataConfig(root=str(tmp_path), val_images="missing"), "val")
    with pytest.raises(ValueError, match="split"):
        build_detection_dataset(cfg, "test")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]}, "unknown image_id 99"),
        ({"image_id": 11, "category_id": 1, "bbox": [1, 1, 2]}, "no valid 'bbox'"),
        ({"image_id": 11, "category_id": 1, "bbox": "1,1,2,2"}, "no valid 'bbox'"),
        ({"image_id": 11, "bbox": [1, 1, 2, 2]}, "category_id None"),
    ],
)
def test_invalid_annotations(tmp_path, bad, message):
    good = {"image_id": 7, "category_id": 1, "bbox": [1, 1, 2, 2]}
    images, ann_file = _write_coco(tmp_path, annotations=[good, bad])
    with pytest.raises(DataError, match=f"annotations.json: annotation #1 .*{message}"):
        CocoDetection(images, ann_file)


def test_duplicate_and_zero_annotation_ids_are_renumbered_so_perfect_detections_score_100(tmp_path, caplog):
    from updetr.evaluation.coco_eval import CocoEvaluator

    anns = [{"id": i, "image_id": img, "category_id": 1, "bbox": box} for i, img, box in [
        (5, 11, [2, 2, 10, 10]), (5, 11, [20, 10, 12, 12]), (0, 7, [4, 4, 10, 10]), (6, 7, [25, 5, 14, 14]),
        (6, 20, [3, 3, 8, 8])]]
    images, ann_file = _write_coco(tmp_path, annotations=anns)
    with caplog.at_level(logging.WARNING, logger="updetr.data.coco"):
        ds = CocoDetection(images, ann_file)
    assert ds.renumbered_ids == 3
    assert any("3 annotations have an id that is duplicated, zero or not a positive integer" in r.getMessage()
               for r in caplog.records)
    ids = ds.coco.getAnnIds()
    assert len(ids) == 5 and len(set(ids)) == 5 and min(ids) > 0
    evaluator = CocoEvaluator(ds.coco, ds.category_ids)
    for i in range(len(ds)):
        t = ds.raw_target(i)
        evaluator.update([int(t["image_id"])], [{"boxes_xyxy": t["boxes_xyxy"], "labels": t["labels"],
                                                 "scores": torch.ones(len(t["labels"]))}])
    evaluator.synchronize()
    assert evaluator.summarize()["AP"] == pytest.approx(100.0)  # 88.8-like before: boxes shared an id


def test_file_names_leading_outside_the_image_folder_are_refused(tmp_path, monkeypatch):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (20, 20)).save(outside)
    for name in ("../../secret.png", str(outside), "sub/../../../secret.png"):
        images, ann_file = _write_coco(tmp_path / "ds", annotations=[])
        data = json.loads(ann_file.read_text())
        data["images"][0]["file_name"] = name
        data["images"][0]["height"] = data["images"][0]["width"] = 20
        ann_file.write_text(json.dumps(data))
        with pytest.raises(DataError, match=r"1 image file names lead outside the folder .*images .*image 11 "
                                            r"file_name .*secret.png.*UPDETR_IMAGES_OUTSIDE_ROOT=1"):
            CocoDetection(images, ann_file)
    monkeypatch.setenv("UPDETR_IMAGES_OUTSIDE_ROOT", "1")  # the user opts out
    assert CocoDetection(images, ann_file).image_paths[1].resolve() == outside.resolve()
    monkeypatch.delenv("UPDETR_IMAGES_OUTSIDE_ROOT")
    (images / "linked.png").symlink_to(outside)  # a link the user placed inside the folder is followed
    data["images"][0]["file_name"] = "linked.png"
    ann_file.write_text(json.dumps(data))
    assert CocoDetection(images, ann_file)[1][0].size == (20, 20)


def test_nan_boxes_are_called_non_finite_and_strings_are_not_numbers(tmp_path, caplog):
    images, ann_file = _write_coco(tmp_path, annotations=[
        {"id": 1, "image_id": 11, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 11, "category_id": 1, "bbox": [float("nan"), 1, 5, 5]},  # JSON NaN: a number
    ])
    with caplog.at_level(logging.WARNING, logger="updetr.data.coco"):
        ds = CocoDetection(images, ann_file)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert ds.dropped_boxes == 1 and ds.nonfinite_boxes == 1
    assert "1 with non-finite coordinates (NaN or infinity; first: annotations[1])" in message
    assert "zero or negative size" not in message
    for value in ("NaN", "10"):
        _write_coco(tmp_path, annotations=[{"id": 1, "image_id": 11, "category_id": 1, "bbox": [value, 1, 5, 5]}])
        with pytest.raises(DataError, match=r"annotation 1 has no valid 'bbox'.*must be JSON numbers, not strings"):
            CocoDetection(images, ann_file)
