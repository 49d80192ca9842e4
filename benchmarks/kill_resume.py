"""Fault injection: SIGKILL a tiny training run, resume it, and check that nothing was lost or lied about.

    python benchmarks/kill_resume.py OUT [--kills 20 --epochs 6 --seed 0 --threads 1]

Runs ``updetr train`` (a tiny DETR on a generated squares dataset, real evaluation every epoch) once
uninterrupted as the reference, then, each in a fresh run folder:

- ``--kills`` runs killed with SIGKILL at a moment drawn uniformly over the reference run's
  timeline: start-up (imports, data, model: until ``config.json`` appears) and training (until the
  process ends). A moment in training is taken from when the killed run's own ``config.json``
  appears, so a slower start-up does not push every kill into it;
- one run killed on purpose at each commit point of an epoch: in the middle of writing
  ``checkpoint.pth.tmp`` (``write``), right after its rename over ``checkpoint.pth`` (``rename``),
  right after ``best.pth`` is linked (``best``), and halfway through appending the metrics line
  (``append``). The faults are installed by this script in the child process (``--child``), not by
  the library.

Each killed folder is resumed with ``updetr train ... --resume FOLDER`` and must then satisfy:
every ``.pth`` file in it loads (``weights_only``), no ``.tmp`` file is left, ``metrics.jsonl`` has
every epoch exactly once with the reference's losses and AP, ``best.pth`` is the reference's best
epoch, and the final weights are bit-identical to the reference's. It prints one line per case and
"N/N resumable, L lost records, D doubled records, W/N weights identical".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = [
    "model.backbone=resnet18", "model.hidden_dim=32", "model.num_heads=4", "model.enc_layers=1",
    "model.dec_layers=2", "model.ffn_dim=64", "model.num_queries=8", "model.dropout=0.0",
    "data.scales=[64]", "data.max_size=64", "data.crop=false",  # one input shape: no new CPU kernels to build
    "data.val_size=64", "data.batch_size=4", "data.num_workers=0", "optim.lr_backbone=0", "eval_every=1",
    'data.train_images="train"', 'data.val_images="val"', 'data.train_annotations="annotations/instances_train.json"',
    'data.val_annotations="annotations/instances_val.json"',
]
POINTS = ("write", "rename", "best", "append")
_TIMING_KEYS = ("train/images_per_s",)  # differ between runs by nature


# ----------------------------------------------------------------------------- the data and the command
def write_squares(root: Path, num_train: int = 8, num_val: int = 4, size: int = 64) -> Path:
    """A COCO-layout dataset of white squares on grey (one class), small enough for seconds-long runs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", num_train), ("val", num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            pixels = np.full((size, size, 3), 60, np.uint8)
            side = int(rng.integers(12, 32))
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            pixels[y:y + side, x:x + side] = 255
            Image.fromarray(pixels).save(root / split / f"{i:04d}.png")
            images.append({"id": i + 1, "file_name": f"{i:04d}.png", "height": size, "width": size})
            annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, side, side],
                                "area": side * side, "iscrowd": 0})
        data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def train_args(data: Path, epochs: int, steps: int) -> list[str]:
    """``updetr train`` arguments of the tiny run (without --output / --resume)."""
    args = ["train", "--preset", "small", "--data-root", str(data), "--epochs", str(epochs), "--no-progress",
            "--set", f"max_steps_per_epoch={steps}"]
    for item in TINY:
        args += ["--set", item]
    return args


def child_command(args: list[str], *, fault: str | None = None, threads: int = 1) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--threads", str(threads)]
    if fault:
        command += ["--fault", fault]
    return command + ["--"] + args


# ----------------------------------------------------------------------------- the child: faults, then the CLI
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(fault: str) -> None:
    """Make this process SIGKILL itself at a commit point of epoch EPOCH: ``POINT:EPOCH`` with POINT
    one of :data:`POINTS` (``best`` fires at the first ``best.pth`` link at or after EPOCH; the first
    epoch always links it)."""
    import torch

    from updetr.engine import run_folder

    point, epoch = fault.split(":")
    epoch = int(epoch)
    count = {"save": 0, "replace": 0, "append": 0}
    if point == "write":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if count["save"] == epoch:  # write half the bytes of the checkpoint, then die
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                _die()
            count["save"] += 1
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif point == "rename":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            if os.path.basename(dst) == "checkpoint.pth":
                if count["replace"] == epoch:
                    _die()  # checkpoint.pth is the new epoch; best.pth and metrics.jsonl are not yet
                count["replace"] += 1

        os.replace = replace
    elif point == "best":
        real_link = run_folder._link_or_copy

        def link(source, target):
            real_link(source, target)
            if target.name == "best.pth" and _epoch_of(source) >= epoch:
                _die()

        run_folder._link_or_copy = link
    elif point == "append":
        real_append = run_folder.RunFolder._append_metrics

        def append(self, record):
            if record["epoch"] == epoch:  # half a line, flushed, then die
                line = json.dumps(run_folder.json_safe(record)) + "\n"
                with open(self.metrics, "a", encoding="utf-8") as f:
                    f.write(line[: len(line) // 2])
                _die()
            real_append(self, record)

        run_folder.RunFolder._append_metrics = append
    else:
        raise SystemExit(f"unknown fault point {point!r}; one of {', '.join(POINTS)}")


def _epoch_of(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def child_main(threads: int, fault: str | None, args: list[str]) -> int:
    import torch

    torch.set_num_threads(threads)
    if fault:
        install_fault(fault)
    from updetr.cli import main

    return main(args)


# ----------------------------------------------------------------------------- one case
def describe(run: Path) -> str:
    """What a killed folder holds: the checkpoint's epoch, the metrics lines, leftovers."""
    from updetr.engine.checkpoint import CheckpointError, load_checkpoint

    if not run.exists() or not any(run.iterdir()):
        return "empty (killed during start-up)"
    parts = []
    if (run / "checkpoint.pth").exists():
        try:
            parts.append(f"checkpoint epoch {load_checkpoint(run / 'checkpoint.pth')['epoch']}")
        except CheckpointError:
            parts.append("checkpoint UNREADABLE")
    else:
        parts.append("no checkpoint yet" + (" (config.json written)" if (run / "config.json").exists() else ""))
    if (run / "metrics.jsonl").exists():
        text = (run / "metrics.jsonl").read_text()
        whole = [json.loads(line)["epoch"] for line in text.splitlines() if line.endswith("}")]
        parts.append(f"metrics {whole}" + (" + a partial line" if text and not text.endswith("\n") else ""))
    parts += [p.name for p in sorted(run.glob("*.tmp"))]
    return ", ".join(parts)


def check(run: Path, reference: Path) -> dict:
    """Compare a resumed folder with the reference run folder (see the module docstring)."""
    import torch

    from updetr.engine.checkpoint import CheckpointError, load_checkpoint

    result = {"loads": True, "leftovers": [p.name for p in run.rglob("*.tmp")]}
    for path in sorted(run.rglob("*.pth")):
        try:
            load_checkpoint(path)
        except CheckpointError:
            result["loads"] = False
    want = {r["epoch"]: r for r in _records(reference)}
    got = _records(run)
    epochs = [r["epoch"] for r in got]
    result["lost"] = len(set(want) - set(epochs))
    result["doubled"] = len(epochs) - len(set(epochs))
    result["records_equal"] = all(_comparable(r) == _comparable(want.get(r["epoch"], {})) for r in got)
    final, ref = load_checkpoint(run / "checkpoint.pth"), load_checkpoint(reference / "checkpoint.pth")
    result["weights_equal"] = final["model"].keys() == ref["model"].keys() and all(
        torch.equal(final["model"][k], v) for k, v in ref["model"].items())
    result["best_equal"] = load_checkpoint(run / "best.pth")["epoch"] == load_checkpoint(reference / "best.pth")["epoch"]
    result["ok"] = (result["loads"] and not result["leftovers"] and not result["lost"] and not result["doubled"]
                    and result["records_equal"] and result["weights_equal"] and result["best_equal"])
    return result


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [json.loads(line) for line in lines]


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in _TIMING_KEYS}


def timeline(case: Path, command: list[str]) -> tuple[float, float]:
    """Run ``command`` (writing into ``case``) to the end: (seconds until config.json appeared, total)."""
    log = case.with_name(case.name + ".log")
    start = time.perf_counter()
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        claimed = None
        while proc.poll() is None:
            if claimed is None and (case / "config.json").exists():
                claimed = time.perf_counter() - start
            time.sleep(0.005)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}):\n{log.read_text()[-2000:]}")
    total = time.perf_counter() - start
    return (claimed if claimed is not None else total), total


class FinishedFirst(Exception):
    """The run ended before its kill moment; ``seconds``: how long its phase of the moment lasted."""

    def __init__(self, seconds: float):
        super().__init__(f"finished {seconds:.1f} s into the phase")
        self.seconds = seconds


def kill_case(case: Path, args: list[str], *, delay: tuple[str, float] | None = None, fault: str | None = None,
              threads: int = 1, resume=None) -> str:
    """Start the run in ``case`` and kill it: at ``fault``, or ``delay`` = ``("start", s)`` seconds
    after launch or ``("train", s)`` seconds after its config.json appeared. Returns what the folder
    held then. ``resume`` (a callable taking the argument list) resumes it; default: a child process.

    Raises:
        FinishedFirst: the run ended before the kill moment (nothing to resume; draw again).
    """
    shutil.rmtree(case, ignore_errors=True)
    log = case.with_name(case.name + ".log")
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(child_command(args + ["--output", str(case)], fault=fault, threads=threads),
                                stdout=subprocess.DEVNULL, stderr=err)
        if delay is not None:
            phase, seconds = delay
            while phase == "train" and proc.poll() is None and not (case / "config.json").exists():
                time.sleep(0.002)
            anchor = time.perf_counter()
            while proc.poll() is None and time.perf_counter() - anchor < seconds:
                time.sleep(0.002)
            if proc.poll() is not None:
                raise FinishedFirst(time.perf_counter() - anchor)
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run to kill ended by itself (exit {proc.returncode}):\n{log.read_text()[-2000:]}")
    state = describe(case)
    resume_args = args + ["--resume", str(case)]
    if resume is not None:
        code = resume(resume_args)
    else:
        done = subprocess.run(child_command(resume_args, threads=threads), capture_output=True, text=True)
        code, err = done.returncode, done.stderr
    if code != 0:
        raise RuntimeError(f"{case}: the resume failed (exit {code}):\n{err[-2000:]}")
    return state


# ----------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="work folder (data, reference run, one folder per kill)")
    parser.add_argument("--kills", type=int, default=20, help="kills at random moments (default 20)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="training steps per epoch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run (the same for all)")
    parser.add_argument("--fault-epoch", type=int, default=2, help="epoch of the on-purpose kills")
    options = parser.parse_args()
    import numpy as np

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    data = write_squares(out / "data")
    args = train_args(data, options.epochs, options.steps)
    reference = out / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    claimed, duration = timeline(reference, child_command(args + ["--output", str(reference)], threads=options.threads))
    print(f"reference run: {options.epochs} epochs of {options.steps} steps in {duration:.1f} s, of which "
          f"{claimed:.1f} s start-up (best epoch {_epoch_of(reference / 'best.pth')})")

    rng = np.random.default_rng(options.seed)
    cases = []
    for i in range(options.kills):
        moment = float(rng.uniform(0, duration))  # on the reference's timeline
        delay = ("start", moment) if moment < claimed else ("train", moment - claimed)
        cases.append((f"random-{i:02d}", delay, None))
    for point in POINTS:  # best.pth is surely linked at epoch 0 (later only when the AP improves)
        epoch = 0 if point == "best" else options.fault_epoch
        cases.append((f"{point}-epoch{epoch}", None, f"{point}:{epoch}"))
    totals = {"ok": 0, "lost": 0, "doubled": 0, "weights": 0}
    redrawn = 0
    for name, delay, fault in cases:
        for _ in range(5):
            try:
                state = kill_case(out / name, args, delay=delay, fault=fault, threads=options.threads)
                break
            except FinishedFirst as early:  # this run was faster than the reference: draw within its own span
                delay, redrawn = (delay[0], float(rng.uniform(0, early.seconds))), redrawn + 1
        else:
            raise RuntimeError(f"{name}: the run kept finishing before its kill moment")
        result = check(out / name, reference)
        totals["ok"] += result["ok"]
        totals["lost"] += result["lost"]
        totals["doubled"] += result["doubled"]
        totals["weights"] += result["weights_equal"]
        when = f"{delay[1]:4.1f} s into {delay[0]:5}" if delay is not None else f"at {fault:>14}"
        verdict = "ok" if result["ok"] else "FAILED " + json.dumps(result)
        print(f"{name:16} killed {when}: {state:60} -> resumed: {verdict}", flush=True)
    n = len(cases)
    if redrawn:
        print(f"({redrawn} random moments fell after the end of a run faster than the reference and were drawn "
              "again within that run's span)")
    print(f"\n{totals['ok']}/{n} resumable, {totals['lost']} lost records, {totals['doubled']} doubled records, "
          f"{totals['weights']}/{n} final weights identical to the uninterrupted run")
    return 0 if totals["ok"] == n else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child = argparse.ArgumentParser()
        child.add_argument("--child", action="store_true")
        child.add_argument("--threads", type=int, default=1)
        child.add_argument("--fault")
        own, rest = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
        parsed = child.parse_args(own)
        sys.exit(child_main(parsed.threads, parsed.fault, rest))
    sys.exit(main())
