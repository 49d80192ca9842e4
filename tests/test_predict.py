"""`updetr predict` on folders with unreadable files: skip, count, write the rest."""

import json
import os

import pytest
import torch
from PIL import Image

from updetr.cli import main
from updetr.presets import make_config
from updetr.engine.checkpoint import save_checkpoint
from updetr.models import build_detr


@pytest.fixture(scope="module")
def detector(tmp_path_factory, tiny_overrides):
    cfg = make_config("small", overrides=tiny_overrides)
    torch.manual_seed(0)
    model = build_detr(cfg.model, 2)
    path = tmp_path_factory.mktemp("predict") / "detector.pth"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "task": "detection",
                           "classes": ["a", "b"], "category_ids": [1, 2], "epoch": 0})
    return path


@pytest.mark.slow
def test_predict_skips_and_lists_unreadable_images_and_writes_the_others(detector, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "a.jpg")
    Image.new("RGB", (30, 40), (10, 200, 10)).save(images / "sub" / "c.png")
    (images / "b_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    os.symlink(images / "gone.png", images / "d_dangling.png")
    os.symlink(".", images / "self")  # a loop: walked once
    out = tmp_path / "pred"
    assert main(["predict", str(images), "--checkpoint", str(detector), "--output", str(out), "--threshold", "0",
                 "--no-progress"]) == 0
    printed = capsys.readouterr()
    detections = json.loads((out / "detections.json").read_text())
    assert [os.path.basename(d["file"]) for d in detections] == ["a.jpg", "c.png"]
    skipped = json.loads((out / "skipped.json").read_text())
    assert sorted(os.path.basename(s["file"]) for s in skipped) == ["b_broken.jpg", "d_dangling.png"]
    assert "skipped 2 of 4 images that cannot be read" in printed.out and "skipped.json" in printed.out
    assert len(list(out.glob("*.png"))) == 2

    (images / "b_broken.jpg").unlink()
    (images / "d_dangling.png").unlink()
    assert main(["predict", str(images), "--checkpoint", str(detector), "--output", str(out), "--no-progress"]) == 0
    assert not (out / "skipped.json").exists()  # no stale list from the earlier run


def test_predict_with_no_readable_image_is_one_line_error(detector, tmp_path, capsys):
    images = tmp_path / "bad"
    images.mkdir()
    (images / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["predict", str(images), "--checkpoint", str(detector), "--output", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 images could be read" in err and "x.png" in err and "Traceback" not in err
