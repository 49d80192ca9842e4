"""Measure the stage rates ``updetr experiment`` plans with, from the runs of a finished (or partly finished) experiment.

Every finished stage folder ``EXP/stages/<kind>-<hash>/`` holds its ``config.json`` and ``metrics.jsonl``, whose
``train/images_per_s`` is the training throughput of that run's process, measured as the protocol ran it (two
one-thread processes side by side on a 2-core CPU). Each run is classed by the rate it measures (fine-tuning on
cached maps or on pixels, pre-training with the CNN frozen or trained, one-shot, panoptic stage 1 or 2) and the
median over its epochs taken; the table prints the median over the runs of each class. ``--write`` puts those
medians into ``src/updetr/stage_rates.json`` (evaluation and CNN-cache rates are not in metrics.jsonl and keep
their stated source).

    python benchmarks/stage_rates.py /tmp/exp            # print
    python benchmarks/stage_rates.py /tmp/exp --write    # and update the rates file
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

from updetr.experiment import RATE_NAMES, RATES_FILE


def rate_name(kind: str, cfg: dict) -> str | None:
    """The stage_rates.json entry a run's training throughput measures (None: not one the estimate uses)."""
    cached = bool(cfg["data"]["cache_features"])
    if kind == "pretrain":
        if not cfg["pretrain"]["freeze_backbone"]:
            return "pretrain_trained_cnn"
        return "pretrain" if cached else "pretrain_uncached"
    if kind == "oneshot":
        return "oneshot" if cached else "oneshot_uncached"
    if kind == "panoptic2":
        return "panoptic_mask"
    if kind in ("detr", "updetr", "panoptic1"):  # panoptic stage 1 is a detector on boxes, as fine-tuning
        return "finetune" if cached else "finetune_uncached"
    return None


def measure(experiment: Path) -> dict[str, list[float]]:
    """Rate name -> the per-run medians of train/images_per_s."""
    stages = experiment / "stages"
    if not stages.is_dir():
        raise SystemExit(f"{experiment}: no stages/ folder; give the --output folder of `updetr experiment`")
    out: dict[str, list[float]] = {}
    for folder in sorted(stages.iterdir()):
        if not (folder / "DONE").is_file() or not (folder / "metrics.jsonl").is_file():
            continue
        kind = folder.name.rsplit("-", 1)[0]
        name = rate_name(kind, json.loads((folder / "config.json").read_text()))
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        speeds = [r["train/images_per_s"] for r in records if "train/images_per_s" in r]
        if name and speeds:
            out.setdefault(name, []).append(statistics.median(speeds))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="the --output folder of updetr experiment")
    parser.add_argument("--write", action="store_true", help=f"update {RATES_FILE}")
    args = parser.parse_args(argv)
    measured = measure(args.experiment)
    if not measured:
        raise SystemExit(f"{args.experiment}: no finished run with train/images_per_s")
    stored = json.loads(RATES_FILE.read_text())
    print("| rate | runs | median img/s | min | max | stored |\n|---|---|---|---|---|---|")
    for name in RATE_NAMES:
        values = measured.get(name)
        old = stored["rates"][name]["images_per_s"]
        if values:
            print(f"| {name} | {len(values)} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} | {old} |")
            if args.write:
                stored["rates"][name] = {
                    "images_per_s": round(statistics.median(values), 1),
                    "source": f"median of {len(values)} runs of updetr experiment (train/images_per_s), "
                              f"python benchmarks/stage_rates.py EXP --write, {date.today().isoformat()}",
                }
        else:
            print(f"| {name} | 0 | – | – | – | {old} |")
    if args.write:
        tmp = RATES_FILE.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(stored, indent=2) + "\n")
        tmp.replace(RATES_FILE)
        print(f"wrote {RATES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
