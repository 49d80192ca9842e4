import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from updetr.config import DataConfig
from updetr.data.build import build_detection_dataset
from updetr.data.io import DataError
from updetr.data.voc import VOC_CLASSES, VOCDetection


def _xml(width, height, objects):
    body = "".join(
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{int(diff)}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, diff, b in objects
    )
    return (
        f"<annotation><folder>VOC</folder><filename>x.jpg</filename><size><width>{width}</width>"
        f"<height>{height}</height><depth>3</depth></size>{body}</annotation>"
    )


def _add_image(devkit, year, name, width, height, objects, sets=("trainval",)):
    base = devkit / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "Annotations" / f"{name}.xml").write_text(_xml(width, height, objects))
    Image.new("RGB", (width, height), (50, 60, 70)).save(base / "JPEGImages" / f"{name}.jpg")
    for image_set in sets:
        with open(base / "ImageSets" / "Main" / f"{image_set}.txt", "a") as f:
            f.write(f"{name}\n")


@pytest.fixture
def devkit(tmp_path):
    devkit = tmp_path / "data" / "VOCdevkit"
    _add_image(devkit, 2007, "000005", 50, 40, [("dog", 0, (1, 1, 10, 20)), ("person", 1, (5, 6, 50, 40))])
    _add_image(devkit, 2007, "000002", 30, 20, [("tvmonitor", 0, (3, 4, 7, 9))])
    _add_image(devkit, 2007, "000009", 30, 20, [("cat", 0, (2, 2, 9, 9))], sets=("test",))
    _add_image(devkit, 2012, "2008_000001", 20, 20, [("aeroplane", 1, (1, 1, 20, 20))])
    return devkit


def test_classes_and_one_based_conversion(devkit):
    ds = VOCDetection(devkit, ["2007/trainval"])
    assert ds.classes == list(VOC_CLASSES) and len(ds.classes) == 20
    assert ds.classes[:3] == ["aeroplane", "bicycle", "bird"] and ds.classes[-1] == "tvmonitor"
    assert ds.category_ids == list(range(1, 21))
    assert len(ds) == 2 and ds.image_ids == [1, 2]
    names = [ds.coco.imgs[i]["file_name"] for i in ds.image_ids]
    assert names == ["VOC2007/JPEGImages/000002.jpg", "VOC2007/JPEGImages/000005.jpg"]
    image, t = ds[1]
    assert image.size == (50, 40) and t["orig_size"].tolist() == [40, 50]
    torch.testing.assert_close(t["boxes_xyxy"], torch.tensor([[0.0, 0, 10, 20], [4, 5, 50, 40]]))
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert t["area"].tolist() == [200.0, 46 * 35]
    assert ds.dropped_boxes == 0 and ds.clipped_boxes == 0
    assert ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[2]))[0]["bbox"] == [0.0, 0.0, 10.0, 20.0]


@pytest.mark.parametrize("mode, kept, crowd", [("crowd", 2, [0, 1]), ("include", 2, [0, 0]), ("exclude", 1, [0])])
def test_difficult_modes(devkit, mode, kept, crowd):
    ds = VOCDetection(devkit, ["2007/trainval"], difficult=mode)
    _, t = ds[1]
    assert len(t["boxes_xyxy"]) == kept and t["iscrowd"].tolist() == crowd
    assert [a["iscrowd"] for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[2]))] == crowd
    with pytest.raises(ValueError, match="difficult"):
        VOCDetection(devkit, difficult="ignore")


def test_coco_eval_ignores_difficult(devkit):
    from pycocotools.cocoeval import COCOeval

    ds = VOCDetection(devkit, ["2007/trainval"], difficult="crowd")
    detections = [  # the non-difficult ground truth exactly, plus one box on the difficult object
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in ds.coco.loadAnns(ds.coco.getAnnIds())
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(ds.coco, ds.coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[1] == pytest.approx(1.0)  # AP50: no false positive on the difficult person


def test_several_sets_and_devkit_parent(devkit):
    ds = VOCDetection(devkit.parent, ["2007/trainval", "2007/test", "2012/trainval"])
    assert len(ds) == 4 and len(set(ds.image_ids)) == 4
    names = [ds.coco.imgs[i]["file_name"] for i in ds.image_ids]
    assert names == sorted(names) and names[-1] == "VOC2012/JPEGImages/2008_000001.jpg"
    assert ds[3][1]["iscrowd"].tolist() == [1]


def test_errors_name_the_xml(devkit):
    xml = devkit / "VOC2007" / "Annotations" / "000002.xml"
    xml.write_text(_xml(30, 20, [("unicorn", 0, (1, 1, 5, 5))]))
    with pytest.raises(DataError, match="000002.xml.*unknown class name 'unicorn'"):
        VOCDetection(devkit)
    xml.write_text("<annotation><size><width>3")
    with pytest.raises(DataError, match="000002.xml: malformed XML"):
        VOCDetection(devkit)
    xml.unlink()
    with pytest.raises(DataError, match="000002.xml: annotation file not found"):
        VOCDetection(devkit)


def test_missing_pieces(devkit, tmp_path):
    (devkit / "VOC2007" / "JPEGImages" / "000005.jpg").unlink()
    with pytest.raises(DataError, match="1 of 2 image files are missing.*000005.jpg"):
        VOCDetection(devkit)
    with pytest.raises(DataError, match="val.txt: image set file not found"):
        VOCDetection(devkit, ["2007/val"])
    with pytest.raises(DataError, match="VOC2010"):
        VOCDetection(devkit, ["2010/trainval"])
    with pytest.raises(DataError, match="YEAR/IMAGESET"):
        VOCDetection(devkit, ["trainval"])
    with pytest.raises(DataError, match="not found"):
        VOCDetection(tmp_path / "nowhere")


def test_clipping_counted(devkit):
    _add_image(devkit, 2007, "000010", 30, 20, [("cat", 0, (25, 15, 40, 30)), ("cat", 0, (5, 5, 4, 9))])
    ds = VOCDetection(devkit)
    assert ds.clipped_boxes == 1 and ds.dropped_boxes == 1
    _, t = ds[2]
    torch.testing.assert_close(t["boxes_xyxy"], torch.tensor([[24.0, 14, 30, 20]]))


def test_build_voc(devkit):
    cfg = DataConfig(format="voc", root=str(devkit.parent), voc_train_sets=["2007/trainval"],
                     voc_val_sets=["2007/test"], voc_difficult="exclude", val_size=32, max_size=64)
    ds = build_detection_dataset(cfg, "val")
    pixels, t = ds[0]
    assert isinstance(ds, VOCDetection) and len(ds) == 1 and pixels.shape == (3, 32, 48)
    assert np.allclose(t["boxes_cxcywh"].numpy(), [[5 / 30, 5 / 20, 8 / 30, 8 / 20]])  # (1, 1, 9, 9) in 0-based xyxy
    assert len(build_detection_dataset(cfg, "train")) == 2
    with pytest.raises(DataError, match="masks"):
        build_detection_dataset(cfg, "val", return_masks=True)


def test_image_set_names_that_are_paths_and_nan_boxes_are_refused(devkit):
    sets = devkit / "VOC2007" / "ImageSets" / "Main"
    (sets / "escape.txt").write_text("000005\n../../../../outside\n")
    with pytest.raises(DataError, match=r"escape.txt: line 2 names '../../../../outside'; VOC image names are plain"):
        VOCDetection(devkit, ["2007/escape"])
    _add_image(devkit, 2007, "000077", 30, 20, [("cat", 0, ("nan", 2, 9, 9))], sets=("nan",))
    with pytest.raises(DataError, match=r"000077.xml: object 0 \(cat\) has a non-finite <bndbox> coordinate"):
        VOCDetection(devkit, ["2007/nan"])
