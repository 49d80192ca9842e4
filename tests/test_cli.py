"""The CLI end to end on a tiny embedded dataset: data, train, eval, predict, pretrain, init-from, query."""

import json

import pytest

from updetr.cli import main
from updetr.data.embedded_sources import EMBEDDED_THING_CLASSES


def _tiny(tiny_overrides):
    args = []
    for item in tiny_overrides:
        args += ["--set", item]
    return args


@pytest.mark.slow
def test_cli_end_to_end(embedded, tiny_overrides, tmp_path, capsys, monkeypatch):
    tiny = _tiny(tiny_overrides) + ["--set", "optim.epochs=1", "--no-progress"]
    run = tmp_path / "detr"
    assert main(["train", "--embedded", str(embedded), "--output", str(run)] + tiny) == 0
    out = capsys.readouterr().out
    assert "| AP | AP50 |" in out
    for name in ("checkpoint.pth", "best.pth", "config.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/loss", "val/AP", "val/AP50"} <= set(record)

    metrics_file = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--embedded", str(embedded), "--json", str(metrics_file), "--no-progress"]) == 0
    evaluated = json.loads(metrics_file.read_text())
    assert evaluated["AP"] == pytest.approx(record["val/AP"], abs=1e-6)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--embedded", str(embedded), "--json", str(metrics_file),
                 "--class-agnostic", "--no-progress"]) == 0
    assert "every class counted as one" in capsys.readouterr().out
    assert set(json.loads(metrics_file.read_text())) == set(evaluated)

    # eval resizes as the checkpoint was trained (not as another preset would), and never augments, either split
    import updetr.engine.detection as detection  # the task's dataset builder, as evaluation during training uses

    seen = []
    real = detection.build_detection_dataset

    def spy(cfg, split, **kwargs):
        seen.append((cfg.val_size, cfg.size_divisibility, split, kwargs.get("augment")))
        return real(cfg, split, **kwargs)

    monkeypatch.setattr(detection, "build_detection_dataset", spy)
    trained = json.loads((run / "config.json").read_text())["data"]
    for split in ("val", "train"):
        assert main(["eval", "--checkpoint", str(run / "best.pth"), "--embedded", str(embedded), "--split", split,
                     "--no-progress"]) == 0
    assert seen == [(trained["val_size"], trained["size_divisibility"], s, False) for s in ("val", "train")]
    monkeypatch.undo()
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--set", "model.num_queries=3"]) == 2
    assert "only data.* fields" in capsys.readouterr().err

    pred = tmp_path / "pred"
    assert main(["predict", str(embedded / "val"), "--checkpoint", str(run / "best.pth"), "--output", str(pred),
                 "--threshold", "0.0", "--no-progress"]) == 0
    detections = json.loads((pred / "detections.json").read_text())
    assert len(detections) == 4 and len(list(pred.glob("*.png"))) == 4
    first = detections[0]["detections"][0]
    assert set(first) == {"label", "category_id", "score", "box_xyxy"}
    assert first["label"] == EMBEDDED_THING_CLASSES[first["category_id"] - 1]  # the benchmark's own class names

    pre = tmp_path / "pre"
    assert main(["pretrain", "--embedded", str(embedded), "--output", str(pre)] + tiny) == 0
    assert "hit rate" in capsys.readouterr().out
    fine = tmp_path / "fine"
    assert main(["train", "--embedded", str(embedded), "--output", str(fine), "--init-from", str(pre / "checkpoint.pth")] + tiny) == 0


def test_cli_errors_are_one_clear_line(embedded, tmp_path, capsys):
    assert main(["train", "--data-root", str(tmp_path / "missing"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(bad), "--embedded", str(embedded)]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert main(["train", "--embedded", str(embedded), "--set", "model.nope=1"]) == 2
    assert "model.nope" in capsys.readouterr().err
    assert main(["pretrain", "--embedded", str(embedded), "--set", "model.num_queries=10", "--set", "pretrain.num_patches=3"]) == 2
    assert "pretrain.num_patches=3" in capsys.readouterr().err
