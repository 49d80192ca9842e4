"""Which query patches does a pre-trained UP-DETR find? The pretext hit rate by the size of the patch.

    python studies/patch_sizes.py PRETRAIN_CHECKPOINT

PRETRAIN_CHECKPOINT is a pre-training run's ``checkpoint.pth`` (e.g. a demo stage ``stages/pretrain-*``). The
run's own evaluation (IoU >= 0.5 between the box of each patch group's most confident query and the patch's box)
is repeated on its validation images and patches, on pixels, and each patch is counted in a bucket of its area
as a fraction of the image. The buckets together give the run's ``val/hit_rate``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from updetr.config import ConfigError
from updetr.engine.checkpoint import CheckpointError
from updetr.engine.inference import evaluation_loader, load_trained
from updetr.engine.pretrain import pretext_ious

# patch area / image area; the square roots (sides of a square patch) are 0.05, 0.1, 0.2, 0.4
AREA_EDGES = (0.0, 0.0025, 0.01, 0.04, 0.16, float("inf"))


def hit_rates_by_size(checkpoint: str) -> list[dict]:
    """One row per area bucket: its bounds, the number of patches, the number found."""
    loaded = load_trained(checkpoint, "cpu", tasks=("pretrain",))
    dataset = loaded.runner.eval_dataset("val")
    rows = [{"area_from": lo, "area_to": hi, "patches": 0, "hits": 0} for lo, hi in zip(AREA_EDGES, AREA_EDGES[1:])]
    model = loaded.model.eval()
    with torch.no_grad():
        for images, targets, patches in evaluation_loader(loaded, dataset, torch.device("cpu"), num_workers=0):
            out = model(images, patches)
            for t, ious in zip(targets, pretext_ious(out, targets, patches.shape[1])):  # the run's own evaluation
                for area, iou in zip((t["boxes_cxcywh"][:, 2] * t["boxes_cxcywh"][:, 3]).tolist(), ious.tolist()):
                    row = next(r for r in rows if r["area_from"] <= area < r["area_to"])
                    row["patches"] += 1
                    row["hits"] += int(iou >= 0.5)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    args = parser.parse_args(argv)
    try:
        rows = hit_rates_by_size(args.checkpoint)
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"patch_sizes.py: error: {err}", file=sys.stderr)
        return 2
    print("| patch area / image area | side of a square patch | patches | hit rate (%) |\n|---|---|---|---|")
    for r in rows:
        hi = "1" if r["area_to"] == float("inf") else f"{r['area_to']:g}"
        side = f"{r['area_from'] ** 0.5:.2f}–{min(r['area_to'], 1.0) ** 0.5:.2f}"
        rate = f"{100.0 * r['hits'] / r['patches']:.1f}" if r["patches"] else "–"
        print(f"| {r['area_from']:g}–{hi} | {side} | {r['patches']} | {rate} |")
    total, hits = sum(r["patches"] for r in rows), sum(r["hits"] for r in rows)
    print(f"| all | | {total} | {100.0 * hits / max(total, 1):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
