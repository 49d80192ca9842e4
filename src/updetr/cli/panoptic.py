"""``updetr panoptic {train,eval,predict}``: parsing and printing only; the work is in the library
(:mod:`updetr.engine.panoptic`, :mod:`updetr.panoptic_predict`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data.embedded import embedded_data_overrides
from ..engine.distributed import resolve_device
from ..engine.inference import evaluation_loader, load_trained
from ..engine.panoptic import run_panoptic_evaluation
from ..panoptic_predict import predict_panoptic
from .common import CommonSubparsers, add_config_args, config_from_args, setup_logging, train

__all__ = ["register", "cmd_panoptic_eval", "cmd_panoptic_predict", "cmd_panoptic_train", "panoptic_overrides"]

_TABLE = ("PQ", "SQ", "RQ", "PQth", "SQth", "RQth", "PQst", "SQst", "RQst", "AP_seg")


def _add_path_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("panoptic files (default: annotations/panoptic_<images folder>.json and its PNG folder)")
    g.add_argument("--train-json", help="train panoptic JSON")
    g.add_argument("--train-png", help="train panoptic PNG folder")
    g.add_argument("--val-json", help="val panoptic JSON")
    g.add_argument("--val-png", help="val panoptic PNG folder")


def _add_postprocess_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    p.add_argument("--threshold", type=float, default=0.85 if defaults else None,
                   help="keep queries whose class probability exceeds this (default 0.85)")
    p.add_argument("--min-area", type=int, default=5 if defaults else None,
                   help="drop segments with fewer pixels (default 5, DETR's area <= 4)")


def register(sub: CommonSubparsers) -> None:
    """Add ``panoptic`` with ``train``, ``eval`` and ``predict`` to ``updetr``'s subcommands."""
    p = sub.add_parser("panoptic", help="panoptic segmentation: DETR's mask head, PQ / SQ / RQ")
    psub = sub.nested(p.add_subparsers(dest="panoptic_command", required=True))

    q = psub.add_parser("train", help="train stage 1 (detector on boxes), stage 2 (frozen detector + mask head) or jointly")
    add_config_args(q)
    q.add_argument("--stage", choices=["1", "2", "joint"], default="1",
                   help="1: detector on the segments' boxes; 2: frozen detector, mask head (needs --init-from); joint")
    q.add_argument("--init-from", help="start from a pre-training, detection or panoptic checkpoint (stage 2: the stage-1 run)")
    q.add_argument("--resume", help="continue exactly from a checkpoint.pth of this run")
    q.add_argument("--mask-loss-coef", type=float, default=1.0, help="focal mask loss weight (default 1)")
    q.add_argument("--dice-loss-coef", type=float, default=1.0, help="dice loss weight (default 1)")
    _add_postprocess_args(q, defaults=True)
    _add_path_args(q)
    q.set_defaults(func=cmd_panoptic_train)

    q = psub.add_parser("eval", help="PQ / SQ / RQ (all, things, stuff) and segmentation AP of a checkpoint")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--split", default="val", choices=["train", "val"])
    q.add_argument("--data-root")
    q.add_argument("--embedded", metavar="DIR", help="the embedded benchmark generated in DIR")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    q.add_argument("--device")
    q.add_argument("--per-class", action="store_true", help="also print PQ / SQ / RQ of every class")
    q.add_argument("--json", help="also write the metrics to this JSON file")
    _add_postprocess_args(q, defaults=False)
    _add_path_args(q)
    q.set_defaults(func=cmd_panoptic_eval)

    q = psub.add_parser("predict", help="panoptic PNG + JSON and a colour overlay for each image")
    q.add_argument("images", nargs="+", help="image files or folders")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--output", default="panoptic_predictions")
    q.add_argument("--device")
    _add_postprocess_args(q, defaults=False)
    q.set_defaults(func=cmd_panoptic_predict)


def panoptic_overrides(args: argparse.Namespace) -> list[str]:
    """The panoptic flags given, as ``panoptic.field=value`` overrides (the ``--set`` grammar)."""
    fields = {"stage": "stage", "mask_loss_coef": "loss_mask", "dice_loss_coef": "loss_dice", "threshold": "threshold",
              "min_area": "min_area", "train_json": "train_annotations", "train_png": "train_segmentations",
              "val_json": "val_annotations", "val_png": "val_segmentations"}  # fmt: skip
    return [f"panoptic.{field}={json.dumps(getattr(args, attr))}" for attr, field in fields.items()
            if getattr(args, attr, None) is not None]


def _print_table(title: str, metrics: dict[str, float]) -> None:
    keys = [k for k in _TABLE if k in metrics]
    if not keys:
        keys = sorted(k for k, v in metrics.items() if isinstance(v, float))
    print(f"\n{title}")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    print("| " + " | ".join("n/a" if math.isnan(metrics[k]) else f"{metrics[k]:.1f}" for k in keys) + " |")


def cmd_panoptic_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args).override(panoptic_overrides(args))
    result, main = train("panoptic", cfg, args)
    if main:
        if result.final_metrics:
            _print_table(f"final validation (stage {cfg.panoptic.stage})", result.final_metrics)
        print(f"run folder: {result.output_dir}")
    return 0


def cmd_panoptic_eval(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    device = resolve_device(args.device or "auto")
    others = [o for o in args.overrides if not o.strip().startswith(("data.", "panoptic."))]
    if others:
        raise ConfigError(f"updetr panoptic eval: --set {others[0]}: only data.* and panoptic.* fields can change; "
                          "the model is the checkpoint's")  # fmt: skip
    # the checkpoint's config (its eval resize included) with only the data location and post-processing changed
    location = []
    if args.data_root or args.embedded:  # the new root's default file layout
        location += [f'panoptic.{k}=""' for k in ("train_annotations", "train_segmentations", "val_annotations",
                                                  "val_segmentations")]  # fmt: skip
    if args.embedded:
        location += embedded_data_overrides(args.embedded)
    if args.data_root:
        location.append(f"data.root={json.dumps(str(args.data_root))}")
    loaded = load_trained(args.checkpoint, device, tasks=("panoptic",),
                          overrides=location + list(args.overrides) + panoptic_overrides(args))
    options = loaded.config.panoptic
    if options.stage == "1":
        raise ConfigError(f"{args.checkpoint} is a stage-1 (boxes only) checkpoint; train the mask head first: "
                          "updetr panoptic train --stage 2 --init-from CHECKPOINT")
    # the dataset and batching of evaluation during training (PanopticTask), so the numbers agree
    dataset = loaded.runner.eval_dataset(args.split)
    with torch.inference_mode():
        pq, ap = run_panoptic_evaluation(loaded.model, evaluation_loader(loaded, dataset, device), device,
                                         threshold=options.threshold, min_area=options.min_area,
                                         progress=not args.no_progress)  # fmt: skip
    metrics = {**pq.summarize(), **ap.summarize()}
    _print_table(f"{args.split} ({len(dataset)} images, threshold {options.threshold})", metrics)
    if args.per_class:
        _print_per_class(pq.per_class())
    if args.json:
        Path(args.json).write_text(json.dumps({**metrics, "per_class": pq.per_class()}, indent=2) + "\n")
    return 0


def _print_per_class(per_class: dict[str, dict[str, Any]]) -> None:
    print("\n| class | thing | PQ | SQ | RQ | TP | FP | FN |\n|---|---|---|---|---|---|---|---|")
    for name, v in per_class.items():
        cells = ["n/a" if math.isnan(v[k]) else f"{v[k]:.1f}" for k in ("PQ", "SQ", "RQ")]
        print(f"| {name} | {'yes' if v['isthing'] else 'no'} | " + " | ".join(cells) + f" | {v['TP']} | {v['FP']} | {v['FN']} |")


def cmd_panoptic_predict(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    device = resolve_device(args.device or "auto")
    loaded = load_trained(args.checkpoint, device, tasks=("panoptic",), overrides=panoptic_overrides(args))
    options = loaded.config.panoptic
    if options.stage == "1":
        raise ConfigError(f"{args.checkpoint} is a stage-1 (boxes only) checkpoint and has no mask head")
    out = predict_panoptic(loaded, args.images, args.output, threshold=options.threshold, min_area=options.min_area,
                           device=device, progress=not args.no_progress)
    print(f"wrote {out / 'panoptic.json'}, panoptic PNGs and overlays to {out}")
    return 0
