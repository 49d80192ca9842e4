"""COCO-style annotation files (``updetr.data.coco_files``): the JSON's structure and the image paths it names,
each error naming the file. ``tests/data/test_coco.py`` checks the same messages through ``CocoDetection``."""

import json

import pytest

from updetr.data.coco_files import (image_paths_inside, is_int, is_number, read_annotation_json, read_coco_json,
                                    validate_images)
from updetr.data.io import DataError


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(DataError, match="missing.json: panoptic annotation file not found"):
        read_annotation_json(tmp_path / "missing.json", "panoptic annotation")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        read_coco_json(broken)


def test_structure_errors_name_the_file_and_the_entry(tmp_path):
    with pytest.raises(DataError, match="a.json: top-level key 'categories' is missing"):
        read_coco_json(_write(tmp_path / "a.json", {"images": [], "annotations": []}))
    image = {"id": 1, "file_name": "x.jpg", "height": 4, "width": 4}
    with pytest.raises(DataError, match=r"b.json: images\[1\] has an invalid or duplicate id 1"):
        read_coco_json(_write(tmp_path / "b.json", {"images": [image, image], "annotations": [], "categories": []}))
    data = {"images": [image], "annotations": [], "categories": [{"id": True, "name": "t"}]}
    with pytest.raises(DataError, match=r"c.json: categories\[0\] has an invalid or duplicate id True"):
        read_coco_json(_write(tmp_path / "c.json", data))
    assert read_coco_json(_write(tmp_path / "d.json", dict(data, categories=[{"id": 1, "name": "t"}])))["images"] == [image]


def test_image_paths_stay_inside_their_folder(tmp_path):
    images = [{"id": 3, "file_name": "sub/a.jpg"}, {"id": 4, "file_name": "b.jpg"}]
    assert image_paths_inside(tmp_path, images, "ann.json") == {3: tmp_path / "sub" / "a.jpg", 4: tmp_path / "b.jpg"}
    with pytest.raises(DataError, match=r"ann.json: 1 panoptic PNG file names lead outside the folder .*"
                                        r"first: panoptic PNG 7 file_name '../x.png'"):
        image_paths_inside(tmp_path, [{"image_id": 7, "file_name": "../x.png"}], "ann.json", what="panoptic PNG")


def test_numbers_are_ints_and_floats_but_not_bools():
    assert is_number(3) and is_number(2.5) and not is_number(True) and not is_number("3")


def test_one_images_validator_for_detection_and_panoptic_files(tmp_path):
    """Both readers check images[] with validate_images; a panoptic file (is_int) refuses float ids and sizes."""
    path = tmp_path / "p.json"
    image = {"id": 1, "file_name": "x.jpg", "height": 4, "width": 4}
    validate_images(path, [image, dict(image, id=2.0)])  # a detection file takes any number
    with pytest.raises(DataError, match=r"p.json: images\[1\] has an invalid or duplicate id 2.0"):
        validate_images(path, [image, dict(image, id=2.0)], is_int)
    with pytest.raises(DataError, match=r"p.json: image 1 has invalid size 4.5x4"):
        validate_images(path, [dict(image, height=4.5)], is_int)
    with pytest.raises(DataError, match=r"p.json: images\[0\] \(id=1\) lacks 'width'"):
        validate_images(path, [{k: v for k, v in image.items() if k != "width"}], is_int)
    with pytest.raises(DataError, match=r"p.json: images\[0\] is not an object"):
        validate_images(path, ["x.jpg"])
    assert is_int(3) and not is_int(3.0) and not is_int(True)
