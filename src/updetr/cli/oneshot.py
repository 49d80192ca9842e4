"""``updetr oneshot {train,eval,predict}``: parsing and printing only; the work is in the library
(:mod:`updetr.engine.one_shot`, :mod:`updetr.engine.inference`, :mod:`updetr.one_shot_predict`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ConfigError
from ..data.embedded import embedded_data_overrides
from ..data.io import parse_image_box
from ..engine.distributed import resolve_device
from ..engine.inference import evaluate_one_shot_result, load_trained
from ..evaluation.one_shot import AP_METHODS, format_table3
from ..one_shot_predict import predict_one_shot
from .common import CommonSubparsers, add_config_args, config_from_args, setup_logging, train

__all__ = ["register", "cmd_oneshot_eval", "cmd_oneshot_predict", "cmd_oneshot_train", "oneshot_overrides"]


def _add_option_args(p: argparse.ArgumentParser, train: bool) -> None:
    g = p.add_argument_group("one-shot options")
    g.add_argument("--split", help="seen/unseen classes: voc (the paper's) | JSON file {'seen': [...], 'unseen': [...]} "
                   "| 'unseen=a,b[;seen=c,d]' (default: data.root/oneshot_split.json, or voc for VOC data)")  # fmt: skip
    g.add_argument("--draws", type=int, help="query patches per (test image, class); AP50 averaged over them (default 5)")
    g.add_argument("--ap-method", choices=AP_METHODS, help="voc07: 11-point (CoAE, default) | voc: all-point area")
    if train:
        g.add_argument("--min-exemplar-size", type=int, help="smallest exemplar box side in pixels (default 8)")
        frozen = g.add_mutually_exclusive_group()
        frozen.add_argument("--freeze-backbone", dest="freeze_backbone", action="store_true", default=None,
                            help="frozen CNN (image and query patch)")  # fmt: skip
        frozen.add_argument("--train-backbone", dest="freeze_backbone", action="store_false",
                            help="train CNN layers 2-4 at optim.lr_backbone (default: trainable iff lr_backbone > 0)")  # fmt: skip
        g.add_argument("--exclude-unseen-images", action="store_true", default=None,
                       help="skip training images showing any unseen object (default: they train on their seen classes)")  # fmt: skip


def oneshot_overrides(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> list[str]:
    """The one-shot flags given, as ``oneshot.field=value`` overrides (the ``--set`` grammar)."""
    fields = {"split": "split", "draws": "num_draws", "ap_method": "ap_method", "min_exemplar_size": "min_exemplar_size",
              "freeze_backbone": "freeze_backbone", "exclude_unseen_images": "exclude_unseen_images"}  # fmt: skip
    return [f"oneshot.{field}={json.dumps(getattr(args, attr))}" for attr, field in fields.items()
            if (names is None or attr in names) and getattr(args, attr, None) is not None]


def register(sub: CommonSubparsers) -> None:
    """Add ``oneshot {train,eval,predict}`` to ``updetr``'s subcommands."""
    p = sub.add_parser("oneshot", help="one-shot detection: find every object of a class from one exemplar")
    action = sub.nested(p.add_subparsers(dest="oneshot_command", required=True))
    leaf = action.add_parser

    t = leaf("train", help="train one-shot detection on the seen classes (CoAE protocol)")
    add_config_args(t)
    t.add_argument("--init-from", help="UP-DETR pre-training checkpoint (keeps patch2query), DETR/UP-DETR detection "
                   "checkpoint (fresh patch2query), or a one-shot checkpoint; default: from scratch")  # fmt: skip
    t.add_argument("--resume", help="continue exactly from a checkpoint.pth of this run")
    _add_option_args(t, train=True)
    t.set_defaults(func=cmd_oneshot_train)

    e = leaf("eval", help="AP50 on seen and unseen classes, printed as paper Table 3")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data-split", default="val", choices=["train", "val"], help="which dataset split to test on")
    e.add_argument("--classes", help="comma-separated class names to evaluate (default: the whole split)")
    e.add_argument("--data-root")
    e.add_argument("--format", choices=["coco", "voc"])
    e.add_argument("--embedded", metavar="DIR")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--device")
    e.add_argument("--json", help="also write the result to this JSON file")
    _add_option_args(e, train=False)
    e.set_defaults(func=cmd_oneshot_eval)

    q = leaf("predict", help="draw every detection of the exemplar's class in target images")
    q.add_argument("--exemplar", required=True, metavar="IMG[:x,y,w,h]",
                   help="exemplar image, optionally with the object's box in pixels (default: the whole image)")  # fmt: skip
    q.add_argument("--image", dest="images", nargs="+", required=True, metavar="TARGET", help="target images or folders")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--output", default="oneshot_predictions")
    q.add_argument("--threshold", type=float, default=0.5, help="minimum match score (default 0.5)")
    q.add_argument("--label", default="match", help="caption of the drawn boxes")
    q.add_argument("--device")
    q.set_defaults(func=cmd_oneshot_predict)


def cmd_oneshot_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    flags = oneshot_overrides(args)
    if flags:
        cfg = cfg.override(flags)
    result, main = train("oneshot", cfg, args)
    if main:
        m = result.final_metrics
        if m:
            print(f"\nfinal validation: AP50 seen {m.get('AP50_seen', float('nan')):.1f}, "
                  f"unseen {m.get('AP50_unseen', float('nan')):.1f}")  # fmt: skip
        print(f"run folder: {result.output_dir}\nevaluate: updetr oneshot eval --checkpoint {result.output_dir / 'checkpoint.pth'}")
    return 0


def cmd_oneshot_eval(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    others = [o for o in args.overrides if not o.strip().startswith(("data.", "oneshot."))]
    if others:
        raise ConfigError(f"updetr oneshot eval: --set {others[0]}: only data.* and oneshot.* fields can change; "
                          "the model is the checkpoint's")  # fmt: skip
    overrides = []
    if args.embedded:
        overrides += embedded_data_overrides(args.embedded)
    if args.data_root:
        overrides.append(f"data.root={json.dumps(args.data_root)}")
    if args.format:
        overrides.append(f"data.format={json.dumps(args.format)}")
    overrides += list(args.overrides) + oneshot_overrides(args, ("draws", "ap_method"))
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    result = evaluate_one_shot_result(
        args.checkpoint, overrides=overrides, data_split=args.data_split, split=args.split, classes=classes,
        device=args.device or "auto", batch_size=args.batch_size, progress=not args.no_progress,
    )  # fmt: skip
    title = (f"One-shot detection, AP50 (%): {result.extra['dataset']}, {result.num_draws} query draws per "
             f"(image, class), {result.method} AP, {result.extra['num_episodes']} episodes")  # fmt: skip
    print(format_table3({f"this checkpoint (init: {result.extra['init']})": result}, title=title))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def cmd_oneshot_predict(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    exemplar, box = parse_image_box(args.exemplar)
    device = resolve_device(args.device or "auto")
    loaded = load_trained(args.checkpoint, device, tasks=("oneshot",))
    out = predict_one_shot(loaded, exemplar, box, args.images, args.output, threshold=args.threshold, label=args.label,
                           device=device, progress=not args.no_progress)  # fmt: skip
    print(f"wrote {out / 'detections.json'} and drawn images to {out}")
    return 0
