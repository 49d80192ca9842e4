"""``updetr train``, ``eval`` and ``predict``: DETR on labelled boxes (parsing and printing; the work is in the library)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ConfigError
from ..engine.distributed import resolve_device
from ..engine.inference import evaluate_loaded, load_trained
from ..predict import predict_images
from .common import CommonSubparsers, add_config_args, config_from_args, flag_overrides, setup_logging, train

__all__ = ["cmd_eval", "cmd_predict", "cmd_train", "register"]


def cmd_train(args: argparse.Namespace) -> int:
    result, main = train("detection", config_from_args(args), args)
    if main:
        _print_metrics("final validation", result.final_metrics)
        print(f"run folder: {result.output_dir}")
    return 0


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    if not metrics:
        return
    keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in metrics] or sorted(metrics)
    print(f"\n{title}")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    print("| " + " | ".join(f"{metrics[k]:.1f}" for k in keys) + " |")


def cmd_eval(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    device = resolve_device(args.device or "auto")
    # the checkpoint's own data config (its image sizes, padding, ...), pointed elsewhere by the flags
    others = [o for o in args.overrides if not o.strip().startswith("data.")]
    if others:
        raise ConfigError(f"updetr eval: --set {others[0]}: only data.* fields can change; the model is the checkpoint's")
    if args.json and Path(args.json).is_dir():  # before a long evaluation, not after it
        raise ConfigError(f"--json {args.json}: is a folder; name a file, e.g. --json {Path(args.json) / 'metrics.json'}")
    data_flags = [o for o in flag_overrides(args) if o.startswith("data.")]
    loaded = load_trained(args.checkpoint, device, tasks=("detection",), overrides=data_flags)
    loaded.runner.class_agnostic = args.class_agnostic
    split = args.split
    # the dataset, batching and metric of evaluation during training, so the numbers agree
    metrics, dataset = evaluate_loaded(loaded, split, device, progress=not args.no_progress)
    what = ", every class counted as one" if args.class_agnostic else ""
    _print_metrics(f"{split} ({len(dataset)} images{what})", metrics)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        tmp.replace(path)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    device = resolve_device(args.device or "auto")
    loaded = load_trained(args.checkpoint, device, tasks=("detection", "pretrain"))
    if loaded.task != "detection":
        raise ConfigError(f"{args.checkpoint} is a {loaded.task} checkpoint; use `updetr query` for pre-training checkpoints")
    out = predict_images(loaded, args.images, args.output, threshold=args.threshold, device=device, progress=not args.no_progress)
    print(f"wrote {out / 'detections.json'} and drawn images to {out}")
    _print_skipped(out)
    return 0


def _print_skipped(out: Path) -> None:
    """One line for the images a prediction pass skipped (listed in ``out/skipped.json``)."""
    if (out / "skipped.json").is_file():
        skipped = json.loads((out / "skipped.json").read_text())
        done = len(json.loads((out / "detections.json").read_text())) if (out / "detections.json").is_file() else 0
        print(f"skipped {len(skipped)} of {len(skipped) + done} images that cannot be read (listed in "
              f"{out / 'skipped.json'}; first: {skipped[0]['error']})")


def register(sub: CommonSubparsers) -> None:
    """Add ``train``, ``eval`` and ``predict`` to ``updetr``'s subcommands."""
    p = sub.add_parser("train", help="train DETR on a COCO/VOC dataset (also under torchrun)")
    add_config_args(p)
    p.add_argument("--resume", help="continue exactly from a checkpoint.pth of this run")
    p.add_argument("--init-from", help="initialise from a pre-training or detection checkpoint (fine-tuning)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO box AP of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--data-root")
    p.add_argument("--format", choices=["coco", "voc"])
    p.add_argument("--embedded", metavar="DIR")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--device")
    p.add_argument("--class-agnostic", action="store_true",
                   help="count every class as one: the AP of the boxes whatever their label (localisation only)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="detect objects in images; JSON + drawn images")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", default="predictions")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score to keep (default 0.5)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_predict)
