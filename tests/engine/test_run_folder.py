"""The run-folder contract (updetr.engine.run_folder): fresh runs, resumes, commits, refusals, the NaN guard."""

import json
import shutil

import pytest
import torch

from updetr.cli import main
from updetr.presets import make_config
from updetr.data.io import DataError
from updetr.engine import loop as L
from updetr.engine import run_folder as R
from updetr.engine.checkpoint import load_checkpoint, save_checkpoint
from updetr.engine.detection import DetectionTask
from updetr.engine.distributed import DistInfo
from updetr.engine.loop import fit
from updetr.engine.run_folder import RunFolderError

FAST = ["max_steps_per_epoch=1", "eval_every=1", "optim.lr_backbone=0"]  # one step an epoch, CNN frozen


@pytest.fixture(autouse=True)
def _no_evaluation(monkeypatch):
    """Evaluation is not under test here: a constant AP (tests that need others patch it again)."""
    monkeypatch.setattr(DetectionTask, "evaluate", lambda self, model, loader, device, progress: {"AP": 1.0})


def _layout(root):
    return [f'data.root="{root}"', 'data.train_images="train"', 'data.val_images="val"',
            'data.train_annotations="annotations/instances_train.json"',
            'data.val_annotations="annotations/instances_val.json"']


def config(tiny, data, out, *extra):
    return make_config("small", overrides=tiny + _layout(data) + FAST + [f'output_dir="{out}"', *extra])


def train(tiny, data, out, *extra, resume=None):
    cfg = config(tiny, data, out, *extra)
    return fit(DetectionTask(cfg), cfg, DistInfo(), resume=resume, progress=False)


def epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def cli_args(tiny, data, *extra):
    args = ["train", "--preset", "small", "--no-progress"]
    for item in tiny + _layout(data) + FAST + list(extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def three_epochs(embedded, tiny_overrides, tmp_path_factory):
    """A finished 3-epoch run whose best epoch is 0 (val AP 5, 1, 3); tests work on copies of it."""
    scores = iter([5.0, 1.0, 3.0])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(DetectionTask, "evaluate", lambda self, model, loader, device, progress: {"AP": next(scores)})
        run = tmp_path_factory.mktemp("runs") / "three"
        train(tiny_overrides, embedded, run, "optim.epochs=3")
    return run


def copy_of(run, tmp_path):
    target = tmp_path / run.name
    shutil.copytree(run, target)  # hard links become copies: best.pth stays the epoch-0 file
    return target


# ----------------------------------------------------------------------------- fresh runs (item 1)
@pytest.mark.slow
def test_a_second_run_into_a_used_folder_is_refused_and_changes_nothing(three_epochs, embedded, tiny_overrides,
                                                                          tmp_path, capsys):
    run = copy_of(three_epochs, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(cli_args(tiny_overrides, embedded, "optim.epochs=3") + ["--output", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{run}: already holds a run" in err and f"--resume {run}" in err and "--output DIR" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_the_default_output_gets_a_new_numbered_folder(embedded, tiny_overrides, tmp_path, monkeypatch, capsys):
    from updetr.cli import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "small").mkdir(parents=True)
    (tmp_path / "runs" / "small" / "config.json").write_text("{}")  # an earlier run holds the preset's default
    (tmp_path / "runs" / "small-2").mkdir()  # an empty folder is free
    cfg = config_from_args(build_parser().parse_args(cli_args(tiny_overrides, embedded)))
    assert cfg.output_dir == "runs/small-2"
    assert "runs/small holds an earlier run; this run writes to runs/small-2" in capsys.readouterr().err
    explicit = config_from_args(build_parser().parse_args(cli_args(tiny_overrides, embedded) + ["--output", "runs/small"]))
    assert explicit.output_dir == "runs/small"  # named by the user: used as given (and refused when occupied)
    resumed = config_from_args(build_parser().parse_args(cli_args(tiny_overrides, embedded)
                                                         + ["--resume", "runs/small/checkpoint.pth"]))
    assert resumed.output_dir == "runs/small"  # a resume continues in the checkpoint's folder


@pytest.mark.parametrize("case", ["file", "unwritable"])
def test_an_unusable_output_is_one_line_before_anything_runs(embedded, tiny_overrides, tmp_path, monkeypatch, capsys,
                                                             case):
    target = tmp_path / "out"
    if case == "file":
        target.write_text("a file")
        expected = f"output_dir={target}: is a file, not a folder"
    else:
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(R.tempfile, "TemporaryFile", denied)
        expected = f"output_dir={target}: cannot write under {tmp_path}, where it would be created: Permission denied"
    assert main(cli_args(tiny_overrides, embedded) + ["--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


@pytest.mark.slow
def test_a_write_failure_mid_run_names_the_file_and_keeps_the_last_epoch(three_epochs, embedded, tiny_overrides,
                                                                         tmp_path, monkeypatch, capsys):
    run = copy_of(three_epochs, tmp_path)

    def disk_full(payload, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(L.torch, "save", disk_full)
    assert main(cli_args(tiny_overrides, embedded, "optim.epochs=4") + ["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint.pth'}: cannot write the checkpoint (No space left on device)" in err
    assert err.count("\n") == 1
    assert load_checkpoint(run / "checkpoint.pth")["epoch"] == 2 and epochs(run) == [0, 1, 2]
    assert not list(run.glob("*.tmp"))


# ----------------------------------------------------------------------------- commits (items 2, 3 and 6)
@pytest.mark.slow
def test_a_lost_or_partial_metrics_line_is_rebuilt_and_a_changed_schedule_is_honoured(three_epochs, embedded,
                                                                                      tiny_overrides, tmp_path):
    run = copy_of(three_epochs, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + lines[1][:17])  # a kill after the rename: epoch 2 never
    (run / "checkpoint.pth.tmp").write_bytes(b"PK\x03\x04 a write cut short")  # appended, epoch 1 cut mid-line
    result = train(tiny_overrides, embedded, run, "optim.epochs=4", "optim.lr=1e-4", "optim.lr_drop=4", resume=str(run))
    assert epochs(run) == [0, 1, 2, 3] and [r["epoch"] for r in result.history] == [0, 1, 2, 3]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[1]) == json.loads(lines[1])
    assert not list(run.glob("*.tmp"))
    # item 3: "lr" is the rate after each epoch's scheduler step: epoch 3 ran at the new 1e-4, then the new
    # drop after 4 epochs applied (the old values, lr 2e-4 dropped after 30 epochs, would give 2e-4)
    assert [r["lr"] for r in result.history] == [2e-4, 2e-4, 2e-4, pytest.approx(1e-5)]
    saved = json.loads((run / "config.json").read_text())
    assert saved["optim"]["lr"] == 1e-4 and saved["optim"]["lr_drop"] == 4 and saved["optim"]["epochs"] == 4
    assert load_checkpoint(run / "checkpoint.pth")["config"]["optim"]["lr"] == 1e-4
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["start_epoch"] == 3
    changed = resumes[-1]["changed"]  # output_dir too: the test resumes a copy of the run
    assert {k: changed[k] for k in ("optim.epochs", "optim.lr", "optim.lr_drop")} == {
        "optim.epochs": [3, 4], "optim.lr": [2e-4, 1e-4], "optim.lr_drop": [30, 4]}


@pytest.mark.slow
def test_a_legacy_checkpoint_reads_metrics_jsonl_and_names_a_corrupt_line(three_epochs, embedded, tiny_overrides,
                                                                          tmp_path):
    run = copy_of(three_epochs, tmp_path)
    ckpt = load_checkpoint(run / "checkpoint.pth")
    del ckpt["history"]  # written before the history travelled inside the checkpoint
    save_checkpoint(run / "checkpoint.pth", ckpt)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + "{not json\n" + lines[2])
    with pytest.raises(RunFolderError, match=r"metrics.jsonl:2: not a metrics record .*fix or remove that line"):
        train(tiny_overrides, embedded, run, "optim.epochs=4", resume=str(run / "checkpoint.pth"))
    (run / "metrics.jsonl").write_text(lines[0] + lines[1] + lines[2][:10])  # a partial last line: dropped
    train(tiny_overrides, embedded, run, "optim.epochs=4", resume=str(run / "checkpoint.pth"))
    assert epochs(run) == [0, 1, 3]  # epoch 2's line was cut before this fix existed; nothing invents it


@pytest.mark.slow
def test_best_pth_is_relinked_when_a_kill_came_between_the_rename_and_the_link(three_epochs, embedded, tiny_overrides,
                                                                              tmp_path, monkeypatch):
    run = copy_of(three_epochs, tmp_path)  # best: epoch 0
    monkeypatch.setattr(DetectionTask, "evaluate", lambda self, m, loader, d, p: {"AP": 9.0})  # epoch 3 is the best

    def killed_before_link(self, payload, record, is_best):
        R.save_checkpoint(self.checkpoint, payload)
        raise KeyboardInterrupt  # the process dies right after the checkpoint's rename

    with monkeypatch.context() as m:
        m.setattr(R.RunFolder, "commit_epoch", killed_before_link)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_overrides, embedded, run, "optim.epochs=4", resume=str(run))
    assert load_checkpoint(run / "checkpoint.pth")["best_epoch"] == 3 and load_checkpoint(run / "best.pth")["epoch"] == 0
    assert epochs(run) == [0, 1, 2]
    train(tiny_overrides, embedded, run, "optim.epochs=4", resume=str(run))  # nothing left to train: heals only
    assert load_checkpoint(run / "best.pth")["epoch"] == 3 and epochs(run) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- resume checks (items 3, 4, 5, 17)
@pytest.mark.slow
def test_an_architecture_change_is_refused_naming_the_fields_before_anything_is_written(three_epochs, embedded,
                                                                                      tiny_overrides, tmp_path, capsys):
    run = copy_of(three_epochs, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    args = cli_args(tiny_overrides, embedded, "optim.epochs=4", "model.hidden_dim=64", "model.dec_layers=3")
    assert main(args + ["--resume", str(run / "checkpoint.pth")]) == 2
    err = capsys.readouterr().err
    assert "cannot resume with a different setup: model.dec_layers 2 -> 3; model.hidden_dim 32 -> 64" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # config.json untouched


def test_resuming_weights_that_are_not_a_training_checkpoint_is_one_line(embedded, tiny_overrides, tmp_path, capsys):
    from torchvision.models import resnet18

    plain = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), plain)
    assert main(cli_args(tiny_overrides, embedded) + ["--resume", str(plain), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "resnet18.pth: not a checkpoint that training can continue" in err and "--init-from" in err
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_resuming_from_an_older_checkpoint_sets_the_later_epochs_aside(three_epochs, embedded, tiny_overrides,
                                                                       tmp_path):
    run = copy_of(three_epochs, tmp_path)
    old_metrics = (run / "metrics.jsonl").read_text()
    train(tiny_overrides, embedded, run, "optim.epochs=2", resume=str(run / "best.pth"))  # best.pth: epoch 0
    aside = run / "superseded-after-epoch-0"
    assert (aside / "metrics.jsonl").read_text() == old_metrics  # epochs 0-2 of the first branch, kept
    assert load_checkpoint(aside / "checkpoint.pth")["epoch"] == 2
    assert epochs(run) == [0, 1] and load_checkpoint(run / "checkpoint.pth")["epoch"] == 1


@pytest.mark.slow
def test_resume_into_another_folder_continues_the_run_there(three_epochs, embedded, tiny_overrides, tmp_path):
    fork = tmp_path / "fork"
    train(tiny_overrides, embedded, fork, "optim.epochs=4", resume=str(three_epochs / "checkpoint.pth"))
    assert epochs(fork) == [0, 1, 2, 3] and load_checkpoint(fork / "best.pth")["epoch"] == 0
    with pytest.raises(RunFolderError, match=r"already holds a run .*cannot continue into it"):
        train(tiny_overrides, embedded, fork, "optim.epochs=5", resume=str(three_epochs / "checkpoint.pth"))


# ----------------------------------------------------------------------------- start-up image check (item 12)
def test_every_unreadable_image_of_every_split_is_reported_before_training(embedded, tiny_overrides, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(embedded, data, ignore=shutil.ignore_patterns("unlabeled", "panoptic_*"))
    train_files = sorted((data / "train").iterdir())
    val_files = sorted((data / "val").iterdir())
    train_files[1].write_bytes(train_files[1].read_bytes()[:200])  # truncated
    val_files[2].write_text("not an image")
    with pytest.raises(DataError, match=r"2 of 12 image files cannot be used: .*train/.*; .*val/.*not an image"):
        train(tiny_overrides, data, tmp_path / "run", "optim.epochs=1")
    assert not (tmp_path / "run").exists()  # nothing was written


# ----------------------------------------------------------------------------- NaN guard
class _NaNOnce(torch.nn.Module):
    """The task's criterion, with a NaN loss at its first call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, output, targets):
        losses = self.inner(output, targets)
        self.calls += 1
        if self.calls == 1:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(three_epochs, embedded,
                                                                                     tiny_overrides, tmp_path,
                                                                                     monkeypatch, capsys):
    run = copy_of(three_epochs, tmp_path)
    weights = load_checkpoint(run / "checkpoint.pth")["model"]
    real = DetectionTask.build_criterion
    monkeypatch.setattr(DetectionTask, "build_criterion", lambda self: _NaNOnce(real(self)))
    assert main(cli_args(tiny_overrides, embedded, "optim.epochs=4") + ["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "detection run stopped: the loss is nan at epoch 3 step 0 (global step 3; " in err and "loss=nan" in err
    assert f"{run / 'checkpoint.pth'} (epoch 2) is the last good checkpoint and was kept" in err
    assert "--resume" in err and err.count("\n") == 1
    ckpt = load_checkpoint(run / "checkpoint.pth")
    assert ckpt["epoch"] == 2 and epochs(run) == [0, 1, 2]
    assert all(torch.equal(ckpt["model"][k], v) for k, v in weights.items())
