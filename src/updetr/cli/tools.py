"""``updetr convert``, ``export``, ``serve`` and ``data embedded``: official checkpoints, ONNX files, the web page
and the offline benchmark (parsing and printing)."""

from __future__ import annotations

import argparse

from ..data.embedded import generate_embedded
from ..data.embedded_compose import DEFAULT_MAX_OBJECTS, DEFAULT_OBJECT_SIZE
from ..export import OPSET, export_onnx, load_for_export, onnx_session, parity
from ..models.official import convert_official_checkpoint, parse_overrides
from ..serve import serve
from .common import CommonSubparsers, setup_logging

__all__ = ["cmd_convert", "cmd_data_embedded", "cmd_export", "cmd_serve", "register"]


def cmd_convert(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    out = convert_official_checkpoint(args.src, args.dst, **parse_overrides(args.overrides))
    print(f"wrote {out}; use it with `updetr predict/eval/query --checkpoint {out}`")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    exported = load_for_export(args.checkpoint)
    out = export_onnx(exported, args.out)
    print(f"wrote {out} (ONNX opset {OPSET}; inputs and outputs: see the README's Export section)")
    if args.check:
        size = exported.config.data.val_size
        for row in parity(exported, onnx_session(out), [(size, size), (size * 3 // 4 + 1, size * 3 // 2)]):
            print(f"ONNX Runtime vs PyTorch at {row['height']}x{row['width']} (batch {row['batch']}): "
                  f"max abs diff logits {row['logits']:.2e}, boxes {row['boxes']:.2e}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    return serve(checkpoint=args.checkpoint, oneshot=args.oneshot, detector=args.detector, demo=args.demo,
                 host=args.host, port=args.port, device=args.device or "cpu", threads=args.threads)


def cmd_data_embedded(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    out = generate_embedded(
        args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
        num_unlabeled=args.num_unlabeled, image_size=(args.min_size, args.max_size),
        object_size=tuple(args.object_size), max_objects=args.max_objects, overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"embedded benchmark in {out}")
    return 0


def register(sub: CommonSubparsers) -> None:
    """Add ``convert``, ``export``, ``serve`` and ``data embedded`` to ``updetr``'s subcommands."""
    p = sub.add_parser("convert", help="convert an official DETR / UP-DETR .pth into an updetr checkpoint")
    p.add_argument("src", help="official checkpoint (.pth)")
    p.add_argument("dst", help="where to write the converted checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="settings the weights cannot show, e.g. --set dilation=true (DC5), --set num_heads=8, "
                        "--set num_patches=10 (repeatable)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a detection, pre-training or one-shot checkpoint as an ONNX file")
    p.add_argument("checkpoint", help="checkpoint.pth (updetr train / pretrain / oneshot train, or converted)")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="file format (onnx)")
    p.add_argument("--check", action="store_true",
                   help="run the file with ONNX Runtime and print its max abs difference from PyTorch at two sizes")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="a local web page: draw a box on a photograph, the model finds it")
    p.add_argument("--checkpoint", help="pre-training checkpoint (query patches); default: the demo's")
    p.add_argument("--oneshot", help="one-shot checkpoint (every object of the drawn box's kind); default: the demo's, if any")
    p.add_argument("--detector", help="detection checkpoint (class names); default: the demo's fine-tuned UP-DETR")
    p.add_argument("--demo", default="demo", help="folder of `updetr demo` searched for the defaults (default: demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="cpu (default) | cuda")
    p.add_argument("--threads", type=int, help="torch threads for inference (default: torch's)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("data", help="dataset utilities")
    dsub = sub.nested(p.add_subparsers(dest="data_command", required=True))
    q = dsub.add_parser("embedded", help="generate the offline embedded benchmark")
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--num-train", type=int, default=800)
    q.add_argument("--num-val", type=int, default=200)
    q.add_argument("--num-unlabeled", type=int, default=1600)
    q.add_argument("--min-size", type=int, default=128, help="smallest image side")
    q.add_argument("--max-size", type=int, default=192, help="largest image side")
    q.add_argument("--object-size", type=float, nargs=2, default=list(DEFAULT_OBJECT_SIZE), metavar=("MIN", "MAX"),
                   help="object side range as fractions of the image's shorter side (default %(default)s; never below 12 px)")
    q.add_argument("--max-objects", type=int, default=DEFAULT_MAX_OBJECTS,
                   help="most objects drawn per image (default %(default)s)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_data_embedded)
