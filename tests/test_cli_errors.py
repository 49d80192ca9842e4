"""Command-line failures that used to print tracebacks: each is one line and exit code 2 (130 for Ctrl-C)."""

import pytest
import torch

import updetr.cli.root as cli_root
from updetr.cli import main
from updetr.presets import make_config
from updetr.data.coco import CocoStyleDataset
from updetr.data.io import DataError
from updetr.engine.checkpoint import save_checkpoint
from updetr.models import build_detr


def _tiny(tiny_overrides, *extra):
    args = []
    for item in list(tiny_overrides) + list(extra):
        args += ["--set", item]
    return args + ["--no-progress"]


def _one_line(err):
    return err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("device, message", [
    ("tpu", "device='tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    ("cuda", "device='cuda': CUDA is not available"),
])
def test_a_device_this_machine_lacks_is_one_line(embedded, tiny_overrides, tmp_path, capsys, monkeypatch, device,
                                                 message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--embedded", str(embedded), "--output", str(tmp_path / "r"), "--device", device]
                + _tiny(tiny_overrides)) == 2
    err = capsys.readouterr().err
    assert message in err and _one_line(err)


@pytest.mark.slow
def test_eval_json_into_a_folder_is_refused_before_evaluating(embedded, tiny_overrides, tmp_path, capsys, monkeypatch):
    cfg = make_config("small", overrides=tiny_overrides)
    path = tmp_path / "detector.pth"
    save_checkpoint(path, {"model": build_detr(cfg.model, 2).state_dict(), "config": cfg.to_dict(), "task": "detection",
                           "classes": ["a", "b"], "category_ids": [1, 2], "epoch": 0})
    monkeypatch.setattr("updetr.data.build.build_detection_dataset",
                        lambda *a, **k: pytest.fail("the dataset was read before the --json check"))
    assert main(["eval", "--checkpoint", str(path), "--embedded", str(embedded), "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--json {tmp_path}: is a folder; name a file" in err and _one_line(err)


def test_ctrl_c_during_start_up_is_an_interruption_not_a_traceback(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt  # e.g. while build_parser imports torch

    monkeypatch.setattr(cli_root, "build_parser", interrupted)
    assert main(["train"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


@pytest.mark.slow  # ~0.5 s, and ~5 s more when the next test collects the failed worker (DataLoader joins it)
def test_a_data_loader_worker_error_is_its_cause_in_one_line(embedded, tiny_overrides, tmp_path, capsys, monkeypatch):
    def broken(self, index):
        raise DataError("some/image.jpg: cannot decode image (broken data stream)")

    monkeypatch.setattr(CocoStyleDataset, "__getitem__", broken)  # the worker (forked) inherits it
    assert main(["train", "--embedded", str(embedded), "--output", str(tmp_path / "r")]
                + _tiny(tiny_overrides, "data.num_workers=1", "optim.lr_backbone=0")) == 2
    err = capsys.readouterr().err
    assert "updetr train: error: some/image.jpg: cannot decode image (broken data stream)" in err
    assert _one_line(err) and "Original Traceback" not in err and "worker" not in err


class _Payload:
    """A pickled object: loading it would run code, so it must be refused."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("kind, message", [
    ("missing", "neither none/imagenet/swav nor an existing file"),
    ("empty", "the file is empty (0 bytes)"),
    ("text", "not a PyTorch backbone weights file (it is a text file"),
    ("pickle", "not loaded, for safety: the backbone weights file carries code or objects that are not plain data"),
    ("folder", "is a folder, not a backbone weights file"),
])
def test_bad_backbone_weights_are_one_line(embedded, tiny_overrides, tmp_path, capsys, kind, message):
    path = tmp_path / "weights.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "pickle":
        torch.save({"conv1.weight": _Payload()}, path)
    elif kind == "folder":
        path.mkdir()
    assert main(["train", "--embedded", str(embedded), "--output", str(tmp_path / "r"), "--backbone-weights", str(path)]
                + _tiny(tiny_overrides)) == 2
    out = capsys.readouterr()
    assert message in out.err and str(path) in out.err and _one_line(out.err), out.err
    assert "this must never run" not in out.out
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.slow
def test_efficientnet_weights_of_another_architecture_name_the_keys(embedded, tiny_overrides, tmp_path, capsys):
    path = tmp_path / "resnet.pth"
    torch.save(build_detr(make_config("small", overrides=tiny_overrides).model, 3).backbone[0].body.state_dict(), path)
    assert main(["train", "--embedded", str(embedded), "--output", str(tmp_path / "r"), "--backbone-weights", str(path)]
                + _tiny(tiny_overrides, "model.backbone=efficientnet_lite0")) == 2
    err = capsys.readouterr().err
    assert "resnet.pth: weights do not fit efficientnet_lite0: missing blocks.0.0" in err and "unexpected conv1.weight" in err
    assert _one_line(err), err
