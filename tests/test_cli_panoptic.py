"""`updetr panoptic train / eval / predict` end to end on a tiny embedded benchmark, weight transfer, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from updetr import cli
from updetr.presets import make_config
from updetr.data.coco_panoptic import rgb_to_id
from updetr.data.embedded_sources import EMBEDDED_STUFF_CLASSES, EMBEDDED_THING_CLASSES
from updetr.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from updetr.engine.panoptic import PanopticTask, build_panoptic_model, initialise_panoptic_model
from updetr.models import build_updetr

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

TINY = ["--set", "model.backbone=resnet18", "--set", "model.hidden_dim=32", "--set", "model.num_heads=4",
        "--set", "model.enc_layers=1", "--set", "model.dec_layers=1", "--set", "model.ffn_dim=64",
        "--set", "model.num_queries=6", "--set", "data.scales=[64,80,96]", "--set", "data.val_size=64",
        "--set", "data.max_size=96", "--set", "data.crop=false", "--set", "data.num_workers=0",
        "--set", "data.batch_size=4", "--epochs", "1", "--device", "cpu", "--no-progress"]
TINY_OVERRIDES = [v for v in TINY[: TINY.index("--epochs")] if v != "--set"]


def run(*argv):
    return cli.main(["panoptic", *argv])


@pytest.fixture(scope="module")
def bench(embedded):
    """The session's tiny embedded benchmark (tests/conftest.py), read only here."""
    return embedded


@pytest.fixture(scope="module")
def runs(bench, tmp_path_factory):
    """Stage 1, then stage 2 from it, each one epoch through the CLI."""
    out = tmp_path_factory.mktemp("runs")
    assert run("train", "--stage", "1", "--embedded", str(bench), "--output", str(out / "s1"), *TINY) == 0
    assert run("train", "--stage", "2", "--embedded", str(bench), "--output", str(out / "s2"),
               "--init-from", str(out / "s1" / "checkpoint.pth"), *TINY) == 0
    return out


@pytest.mark.slow
def test_stage_one_then_stage_two(runs):
    s1 = [json.loads(line) for line in (runs / "s1" / "metrics.jsonl").read_text().splitlines()]
    s2 = [json.loads(line) for line in (runs / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert "val/AP" in s1[-1] and "train/loss_mask" not in s1[-1]
    assert {"val/PQ", "val/PQth", "val/PQst", "val/AP_seg", "train/loss_mask", "train/loss_dice"} <= set(s2[-1])
    first, second = load_checkpoint(runs / "s1" / "checkpoint.pth"), load_checkpoint(runs / "s2" / "checkpoint.pth")
    assert first["task"] == second["task"] == "panoptic"
    assert second["config"]["panoptic"]["stage"] == "2" and len(second["classes"]) == 18
    # the stage-1 detector really loaded under the detr. prefix, and stayed frozen in stage 2
    detector = {k: v for k, v in second["model"].items() if k.startswith("detr.")}
    assert detector and set(detector) == {"detr." + k for k in first["model"]}
    for key, value in first["model"].items():
        torch.testing.assert_close(detector["detr." + key], value, msg=key)
    assert any(k.startswith("mask_head.") for k in second["model"])


@pytest.mark.slow
def test_eval_prints_table_four(runs, bench, capsys, tmp_path):
    out_json = tmp_path / "metrics.json"
    assert run("eval", "--checkpoint", str(runs / "s2" / "checkpoint.pth"), "--embedded", str(bench), "--threshold", "0",
               "--device", "cpu", "--no-progress", "--per-class", "--json", str(out_json)) == 0
    printed = capsys.readouterr().out
    assert "| PQ | SQ | RQ | PQth | SQth | RQth | PQst | SQst | RQst | AP_seg |" in printed
    assert "| grass | no |" in printed
    metrics = json.loads(out_json.read_text())
    assert 0 <= metrics["PQ"] <= 100 and 0 <= metrics["AP_seg"] <= 100
    assert list(metrics["per_class"]) == list(EMBEDDED_THING_CLASSES + EMBEDDED_STUFF_CLASSES)  # every category


@pytest.mark.slow
def test_predict_writes_png_json_and_overlay(runs, bench, tmp_path, capsys):
    out = tmp_path / "pred"
    images = sorted((bench / "val").glob("*.jpg"))[:2]
    assert run("predict", *map(str, images), "--checkpoint", str(runs / "s2" / "checkpoint.pth"), "--output", str(out),
               "--threshold", "0", "--device", "cpu", "--no-progress") == 0
    result = json.loads((out / "panoptic.json").read_text())
    assert len(result["annotations"]) == 2 and len(result["categories"]) == 18
    for ann, image in zip(result["annotations"], images):
        ids = rgb_to_id(np.asarray(Image.open(out / ann["file_name"])))
        with Image.open(image) as original:
            assert ids.shape == (original.height, original.width)
        listed = {s["id"] for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == listed
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum())
        assert (out / ann["file_name"].replace(".png", "_overlay.png")).is_file()


@pytest.mark.slow
def test_stage_one_checkpoint_cannot_be_evaluated(runs, bench, capsys):
    assert run("eval", "--checkpoint", str(runs / "s1" / "checkpoint.pth"), "--embedded", str(bench), "--device", "cpu") == 2
    assert "stage-1" in capsys.readouterr().err


def test_stage_two_needs_a_stage_one_checkpoint(bench, tmp_path, capsys):
    assert run("train", "--stage", "2", "--embedded", str(bench), "--output", str(tmp_path / "x"), *TINY) == 2
    assert "init_from" in capsys.readouterr().err


def test_bad_categories_fail_with_the_file_name(bench, tmp_path, capsys):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(bench, root)
    path = root / "annotations" / "panoptic_train.json"
    data = json.loads(path.read_text())
    for category in data["categories"]:
        category.pop("isthing")
    path.write_text(json.dumps(data))
    assert run("train", "--embedded", str(root), "--output", str(tmp_path / "y"), *TINY) == 2
    err = capsys.readouterr().err
    assert "panoptic_train.json" in err and "isthing" in err


# ------------------------------------------------------------------------------------ weight transfer
def _task(bench, stage, init_from=""):
    cfg = make_config("small", overrides=TINY_OVERRIDES + [f"data.root={json.dumps(str(bench))}", "data.train_images=train",
                                                            "data.val_images=val", f"init_from={json.dumps(init_from)}",
                                                            f"panoptic.stage={stage}"])
    task = PanopticTask(cfg)
    task.train_dataset()
    return task


@pytest.mark.slow
def test_joint_from_an_updetr_pretraining_checkpoint(bench, tmp_path):
    task = _task(bench, "joint")
    pretrained = build_updetr(task.cfg.model, task.cfg.pretrain)
    save_checkpoint(tmp_path / "pre.pth", {"model": pretrained.state_dict(), "task": "pretrain"})
    model = build_panoptic_model(task.cfg, task.num_classes, "joint")
    report = initialise_panoptic_model(model, tmp_path / "pre.pth", task.classes)
    own = model.state_dict()
    for key, value in pretrained.state_dict().items():
        if key.startswith(("patch2query.", "feature_align.", "class_embed.")):
            assert "detr." + key not in own or not key.startswith(("patch2query.", "feature_align."))
            continue
        torch.testing.assert_close(own["detr." + key], value, msg=key)
    assert len(report["loaded"]) > 50
    assert any(k.startswith("detr.class_embed.") for k in report["kept_fresh"])  # new label set: fresh head


@pytest.mark.slow
def test_detrsegm_checkpoint_into_a_stage_one_detector(runs, bench):
    task = _task(bench, "1")
    model = build_panoptic_model(task.cfg, task.num_classes, "1")
    initialise_panoptic_model(model, runs / "s2" / "checkpoint.pth", task.classes)
    source = load_checkpoint(runs / "s2" / "checkpoint.pth")["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, source["detr." + key], msg=key)  # class head kept: same classes


@pytest.mark.slow
def test_stage_two_rejects_a_detector_of_other_classes(bench, tmp_path):
    task = _task(bench, "2")
    source = build_panoptic_model(task.cfg, 5, "1").state_dict()
    save_checkpoint(tmp_path / "det.pth", {"model": source, "task": "detection", "classes": list("abcde")})
    model = build_panoptic_model(task.cfg, task.num_classes, "2")
    with pytest.raises(CheckpointError, match="trained on these classes"):
        initialise_panoptic_model(model, tmp_path / "det.pth", task.classes, require_class_head=True)
    # a detector of another width is an architecture error listing keys, never a silent partial load
    task.cfg.model.hidden_dim = 64
    with pytest.raises(CheckpointError, match="wrong shape"):
        initialise_panoptic_model(build_panoptic_model(task.cfg, task.num_classes, "joint"), tmp_path / "det.pth", task.classes)


@pytest.mark.slow
def test_stage_one_trains_on_cached_features_and_stage_two_refuses_them(runs, bench, tmp_path, capsys):
    cached = ["--set", "data.cache_features=true", "--set", "optim.lr_backbone=0"]
    assert run("train", "--stage", "1", "--embedded", str(bench), "--output", str(tmp_path / "c1"), *TINY, *cached) == 0
    record = [json.loads(line) for line in (tmp_path / "c1" / "metrics.jsonl").read_text().splitlines()][-1]
    assert "val/AP" in record and record["train/loss"] > 0
    assert run("train", "--stage", "2", "--embedded", str(bench), "--output", str(tmp_path / "c2"),
               "--init-from", str(tmp_path / "c1" / "checkpoint.pth"), *TINY, *cached) != 0
    assert "intermediate layers" in capsys.readouterr().err
