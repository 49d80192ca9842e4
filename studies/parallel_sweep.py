"""Demo stages as parallel 2-thread jobs on a many-core machine: DETR and UP-DETR arms over seeds and variants.

    python studies/parallel_sweep.py run OUT --seeds 1 2 --deadline 505 \\
        --job detr:0:cpu --job up5:5:cpu --job up10:10:cpu \\
        --job "upG30b32:30:cuda:data.batch_size=32;data.num_workers=3" \\
        [--budget num_train=200 --budget finetune_epochs=84]
    python studies/parallel_sweep.py report OUT

A job is ``NAME:PRE_EPOCHS:PRE_DEVICE[:OVERRIDES]``: PRE_EPOCHS of UP-DETR pre-training (the demo's
``pretrain_config``, on PRE_DEVICE, with the ``;``-separated config overrides) followed by the demo's fine-tuning
(``finetune_config``, on the CPU); PRE_EPOCHS 0 is the DETR arm. Every job runs in its own process with
2 threads, all jobs at once, so a 16-core machine runs eight 2-core demos side by side. The benchmark comes from
the demo's stage cache under ``OUT/s<seed>/stages`` (``prepare_data``, written once per seed before the jobs
start); the frozen CNN of every job is the budget's ImageNet backbone (``--budget backbone=...``, default
EfficientNet-Lite0 with the weights of its installed package). Jobs still running at ``--deadline`` seconds are
stopped; ``report`` prints what every job logged (fine-tuning AP / AP50 in percent at each evaluation epoch,
the pre-training's last loss, GIoU loss and pretext hit rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def budget_for(seed: int, overrides: list[str] | None = None):
    """The demo's default budget with ``--budget FIELD=VALUE`` overrides (as ``updetr demo`` takes them) and ``seed``."""
    from updetr.demo import DemoBudget, apply_budget_overrides

    return dataclasses.replace(apply_budget_overrides(DemoBudget(), list(overrides or [])), seed=seed)


def _budget_overrides() -> list[str]:
    """The sweep's ``--budget`` items, handed to its job processes through the environment."""
    raw = os.environ.get("UPDETR_SWEEP_BUDGET", "")
    return json.loads(raw) if raw else []


def run_job(out: Path, seed: int, name: str, pre_epochs: int, pre_device: str, extra: list[str]) -> None:
    import logging

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    # the job's log (OUT/s<seed>_<name>.log) gets the training loop's per-epoch lines, as updetr's commands print them
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from updetr.demo import common_overrides, finetune_config, prepare_data, pretrain_config
    from updetr.engine.detection import DetectionTask
    from updetr.engine.pretrain import PretrainTask
    from updetr.stages import run_fit

    root = out / f"s{seed}"
    budget = budget_for(seed, _budget_overrides())
    data_dir = prepare_data(root, budget, progress=False)
    job_dir = root / name
    init = ""
    if pre_epochs > 0:
        cfg = pretrain_config(budget, common_overrides(data_dir, budget, pre_device), pre_epochs, extra)
        t = time.time()
        run_fit(PretrainTask, cfg.override([f"output_dir={json.dumps(str(job_dir / 'pre'))}"]), progress=False)
        print(f"[{name} s{seed}] pre-training done in {time.time() - t:.0f} s", flush=True)
        init = str(job_dir / "pre" / "checkpoint.pth")
    cfg = finetune_config(budget, common_overrides(data_dir, budget, "cpu"), budget.finetune_epochs, init)
    t = time.time()
    run_fit(DetectionTask, cfg.override([f"output_dir={json.dumps(str(job_dir / 'ft'))}"]), progress=False)
    print(f"[{name} s{seed}] fine-tuning done in {time.time() - t:.0f} s", flush=True)


def parse_job(spec: str) -> tuple[str, int, str, list[str]]:
    parts = spec.split(":", 3)
    if len(parts) < 3:
        raise SystemExit(f"--job {spec!r}: expected NAME:PRE_EPOCHS:PRE_DEVICE[:OVERRIDES]")
    return parts[0], int(parts[1]), parts[2], [o for o in (parts[3] if len(parts) > 3 else "").split(";") if o]


def run(args: argparse.Namespace) -> None:
    from updetr.config import ConfigError

    start = time.time()
    try:  # a wrong --budget fails here, before anything is written
        budget_for(args.seeds[0], args.budget)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONUNBUFFERED="1",
               UPDETR_SWEEP_BUDGET=json.dumps(args.budget))  # the prep and job processes read it
    # the benchmark first, one process per seed, so the jobs do not race to write it
    prep = [subprocess.Popen([sys.executable, __file__, "prep", str(out), str(s)], env=env) for s in args.seeds]
    if any(p.wait() for p in prep):
        raise SystemExit("preparing the benchmark failed")
    print(f"benchmark ready after {time.time() - start:.0f} s", flush=True)
    procs = []
    for s in args.seeds:
        for spec in args.job:
            name, epochs, device, extra = parse_job(spec)
            log = open(out / f"s{s}_{name}.log", "w")
            cmd = [sys.executable, __file__, "job", str(out), str(s), name, str(epochs), device] + extra
            procs.append((f"s{s} {name}", subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
    while time.time() - start < args.deadline and any(p.poll() is None for _, p in procs):
        time.sleep(5)
    for label, p in procs:
        if p.poll() is None:
            p.kill()
        print(f"{label}: {'stopped at the deadline' if p.returncode is None or p.returncode < 0 else f'exit {p.returncode}'}",
              flush=True)
    print(f"total {time.time() - start:.0f} s", flush=True)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def report(out: Path) -> None:
    for seed_dir in sorted(out.glob("s[0-9]*")):
        if not seed_dir.is_dir():
            continue
        for job in sorted(p for p in seed_dir.iterdir() if p.is_dir() and p.name != "stages"):
            row = [f"{seed_dir.name} {job.name:10s}"]
            pre = _jsonl(job / "pre" / "metrics.jsonl")
            if pre:
                hits = [h["val/hit_rate"] for h in pre if "val/hit_rate" in h]
                last = pre[-1]
                row.append(f"pre-training: {last['epoch'] + 1} ep, loss {last['train/loss']:.3f}, "
                           f"GIoU loss {last['train/loss_giou']:.3f}, hit rate {hits[-1] if hits else float('nan'):.1f} %")
            ft = _jsonl(job / "ft" / "metrics.jsonl")
            if ft:
                points = " ".join(f"{h['epoch'] + 1}:{h['val/AP']:.2f}/{h['val/AP50']:.2f}" for h in ft if "val/AP" in h)
                row.append(f"fine-tuning AP/AP50 at epoch {points or '-'} (trained {ft[-1]['epoch'] + 1} ep)")
            print(" | ".join(row))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("prep", "job"):  # internal: one process of ``run``
        if sys.argv[1] == "prep":
            from updetr.demo import prepare_data

            seed = int(sys.argv[3])
            prepare_data(Path(sys.argv[2]) / f"s{seed}", budget_for(seed, _budget_overrides()), progress=False)
        else:
            out, seed, name, epochs, device, *extra = sys.argv[2:]
            run_job(Path(out), int(seed), name, int(epochs), device, extra)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("output")
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    r.add_argument("--job", action="append", required=True, metavar="NAME:PRE_EPOCHS:PRE_DEVICE[:OVERRIDES]")
    r.add_argument("--deadline", type=float, default=600.0)
    r.add_argument("--budget", action="append", default=[], metavar="FIELD=VALUE",
                   help="change the demo budget of every job (repeatable), as for updetr demo, e.g. num_train=200")
    rep = sub.add_parser("report")
    rep.add_argument("output")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        report(Path(args.output))


if __name__ == "__main__":
    main()
