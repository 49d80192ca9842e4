"""The final metrics of every finished run of an ``updetr experiment`` folder, while it runs or after.

The report (``EXP/reports/README.md``) is written once every run has finished; this lists what the finished runs
scored so far, one row per stage folder with its seed, epochs, start (``init_from``'s stage) and its last
evaluation, grouped as the tables use them (Table 1: ``detr`` / ``updetr``; Table 3: ``oneshot``; Table 4:
``panoptic1`` / ``panoptic2``).

    python benchmarks/experiment_runs.py /tmp/exp [--kind detr updetr]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("AP", "AP50", "AP50_seen", "AP50_unseen", "PQ", "PQth", "PQst", "hit_rate")


def finished_runs(experiment: Path) -> list[dict]:
    """One dict per finished stage: name, kind, seed, epochs, init (stage name or "scratch"), and its last metrics."""
    stages = experiment / "stages"
    if not stages.is_dir():
        raise SystemExit(f"{experiment}: no stages/ folder; give the --output folder of `updetr experiment`")
    rows = []
    for folder in sorted(stages.iterdir()):
        if not (folder / "DONE").is_file() or not (folder / "metrics.jsonl").is_file():
            continue
        cfg = json.loads((folder / "config.json").read_text())
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evaluated = [r for r in records if any(f"val/{m}" in r for m in METRICS)]
        last = evaluated[-1] if evaluated else {}
        rows.append({"name": folder.name, "kind": folder.name.rsplit("-", 1)[0], "seed": cfg["seed"],
                     "epochs": cfg["optim"]["epochs"],
                     "init": Path(cfg["init_from"]).parent.name if cfg.get("init_from") else "scratch",
                     "metrics": {m: last[f"val/{m}"] for m in METRICS if f"val/{m}" in last}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="the --output folder of updetr experiment")
    parser.add_argument("--kind", nargs="+", help="only these kinds (detr, updetr, pretrain, oneshot, panoptic1, ...)")
    args = parser.parse_args(argv)
    rows = [r for r in finished_runs(args.experiment) if not args.kind or r["kind"] in args.kind]
    print("| run | seed | epochs | start | metrics |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["kind"], r["epochs"], r["init"] == "scratch", r["seed"])):
        shown = ", ".join(f"{k} {v:.1f}" for k, v in r["metrics"].items())
        print(f"| {r['name']} | {r['seed']} | {r['epochs']} | {r['init']} | {shown or '–'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
