"""Run several ``updetr demo`` budgets side by side (one process each) and collect their tables.

    python studies/demo_sweep.py --output sweep --device cuda --deadline 360 \\
        --variant base: "--variant long:finetune_epochs=18;pretrain_epochs=6"

Each variant is ``NAME:FIELD=VALUE;FIELD=VALUE`` (``--budget`` items of ``updetr demo``).
The benchmark (the demo's stage 1, ``prepare_data``) is generated once per distinct data budget
and copied into each variant's folder, where the demo's stage cache picks it up; every variant's
frozen CNN is its budget's ImageNet backbone, read from the installed weight package. Meant for
a GPU machine, where the processes run concurrently; variants still running at ``--deadline``
are stopped and reported with what they logged.

Measured on one H100 (16 CPU cores): six variants at once ran at only ~2 training steps/s each
(the GPU time-slices between processes and each small step is launch-bound), so in 5 minutes
none got past 600 fine-tuning steps. Run two or three at a time, or one after another.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from updetr.demo import DemoBudget, apply_budget_overrides, prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:ITEMS")
    parser.add_argument("--common", default="", help="budget items added to every variant")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds before running variants are stopped")
    parser.add_argument("--report", help="markdown file for the collected tables (default OUTPUT/sweep.md)")
    args = parser.parse_args()

    root = Path(args.output)
    shared = root / "shared"
    start = time.perf_counter()
    variants = {}
    for spec in args.variant:
        name, _, items = spec.partition(":")
        items = [i for i in (args.common.split(";") + items.split(";")) if i]
        variants[name] = (items, apply_budget_overrides(DemoBudget(), items))
    for name, (items, budget) in variants.items():
        prepare_data(shared, budget, progress=False)  # cached per distinct data key
    procs = {}
    for name, (items, budget) in variants.items():
        out = root / name
        (out / "stages").mkdir(parents=True, exist_ok=True)
        for stage in (shared / "stages").iterdir():
            if not (out / "stages" / stage.name).exists():
                shutil.copytree(stage, out / "stages" / stage.name)
        cmd = [sys.executable, "-m", "updetr", "demo", "--output", str(out), "--no-progress", "--device", args.device]
        for item in items:
            cmd += ["--budget", item]
        log = open(out / "demo.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.perf_counter())
    finished = {}
    while procs:
        for name in list(procs):
            proc, log, t0 = procs[name]
            if proc.poll() is not None:
                finished[name] = (proc.returncode, time.perf_counter() - t0)
                log.close()
                del procs[name]
        if time.perf_counter() - start > args.deadline:
            for name, (proc, log, t0) in procs.items():
                proc.kill()
                finished[name] = ("stopped at deadline", time.perf_counter() - t0)
                log.close()
            break
        time.sleep(2)

    lines = [f"# demo sweep ({args.device}, {time.perf_counter() - start:.0f} s)", ""]
    for name, (items, budget) in variants.items():
        rc, secs = finished[name]
        lines += [f"## {name}: `{' '.join(items) or '(defaults)'}` — exit {rc}, {secs:.0f} s", ""]
        report = root / name / "report" / "report.md"
        if report.is_file():
            lines += report.read_text().split("![convergence]")[0].splitlines()[4:]
        else:  # partial: the AP each arm logged so far
            for arm in ("detr", "updetr"):
                for metrics in sorted((root / name / "stages").glob(f"{arm}-*/metrics.jsonl")):
                    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                    aps = [(r["epoch"], r.get("val/AP"), r.get("val/AP50")) for r in rows if r.get("val/AP") is not None]
                    lines.append(f"- {arm}: (epoch, AP, AP50) {aps}")
        lines.append("")
    text = "\n".join(lines)
    Path(args.report or root / "sweep.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
