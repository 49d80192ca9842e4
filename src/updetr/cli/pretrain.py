"""``updetr pretrain`` and ``updetr query``: UP-DETR's random query patch detection (parsing and printing)."""

from __future__ import annotations

import argparse
import json

from ..engine.distributed import resolve_device
from ..engine.inference import load_trained
from ..query import run_query
from .common import CommonSubparsers, add_config_args, config_from_args, setup_logging, train

__all__ = ["cmd_pretrain", "cmd_query", "register"]


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.images:
        cfg = cfg.override([f"data.images={json.dumps(str(args.images))}"])
    result, main = train("pretrain", cfg, args)
    if main:
        if result.final_metrics:
            print(f"pretext hit rate (IoU >= 0.5): {result.final_metrics['hit_rate']:.1f}%  "
                  f"mean IoU: {result.final_metrics['mean_iou']:.3f}")
        print(f"run folder: {result.output_dir}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    device = resolve_device(args.device or "auto")
    loaded = load_trained(args.checkpoint, device, tasks=("pretrain", "detection"))
    results = run_query(loaded, args.image, boxes=args.box, exemplars=args.exemplar, output_dir=args.output, device=device)
    for i, r in enumerate(results):
        where = f" (cut from {[round(v) for v in r.query_box_xyxy]})" if r.query_box_xyxy else ""
        print(f"patch {i}{where}: found at {[round(v) for v in r.box_xyxy]} score {r.score:.2f}")
    print(f"drawn in {args.output}")
    return 0


def register(sub: CommonSubparsers) -> None:
    """Add ``pretrain`` and ``query`` to ``updetr``'s subcommands."""
    p = sub.add_parser("pretrain", help="UP-DETR pre-training on a folder of unlabelled images (also under torchrun)")
    add_config_args(p, default_preset="pretrain-small")
    p.add_argument("--images", help="folder tree of unlabelled images (searched recursively)")
    p.add_argument("--resume", help="continue exactly from a checkpoint.pth of this run")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("query", help="find query patches in an image with a pre-trained UP-DETR model")
    p.add_argument("--checkpoint", required=True, help="pre-training checkpoint (ours or converted)")
    p.add_argument("--image", required=True)
    p.add_argument("--box", action="append", help="x,y,w,h of a patch cut from --image (repeatable)")
    p.add_argument("--exemplar", action="append", help="IMG or IMG:x,y,w,h, a patch from another image (repeatable)")
    p.add_argument("--output", default="query")
    p.add_argument("--device")
    p.set_defaults(func=cmd_query)
