"""Command-line interface: parsing only; every subcommand calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from .cli_common import add_config_args, config_from_args, flag_overrides, setup_logging
from .config import ConfigError

log = logging.getLogger("updetr")


# ----------------------------------------------------------------------------- train / eval / predict
def cmd_train(args: argparse.Namespace) -> int:
    from .engine.detection import DetectionTask
    from .engine.distributed import cleanup, init_distributed
    from .engine.loop import fit

    cfg = config_from_args(args)
    dist_info = init_distributed(cfg.device)
    setup_logging(dist_info.rank, args.verbose)
    try:
        result = fit(DetectionTask(cfg), cfg, dist_info, resume=args.resume, progress=not args.no_progress)
    finally:
        cleanup()
    if dist_info.is_main:
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
    from .engine.distributed import resolve_device
    from .engine.inference import evaluate_loaded, load_trained

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
    from .engine.distributed import resolve_device
    from .engine.inference import load_trained
    from .predict import predict_images

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


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .engine.distributed import cleanup, init_distributed
    from .engine.loop import fit
    from .engine.pretrain import PretrainTask

    cfg = config_from_args(args)
    if args.images:
        cfg = cfg.override([f"data.images={json.dumps(str(args.images))}"])
    dist_info = init_distributed(cfg.device)
    setup_logging(dist_info.rank, args.verbose)
    try:
        result = fit(PretrainTask(cfg), cfg, dist_info, resume=args.resume, progress=not args.no_progress)
    finally:
        cleanup()
    if dist_info.is_main:
        if result.final_metrics:
            print(f"pretext hit rate (IoU >= 0.5): {result.final_metrics['hit_rate']:.1f}%  "
                  f"mean IoU: {result.final_metrics['mean_iou']:.3f}")
        print(f"run folder: {result.output_dir}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from .engine.distributed import resolve_device
    from .engine.inference import load_trained
    from .query import run_query

    setup_logging(0, args.verbose)
    device = resolve_device(args.device or "auto")
    loaded = load_trained(args.checkpoint, device, tasks=("pretrain", "detection"))
    results = run_query(loaded, args.image, boxes=args.box, exemplars=args.exemplar, output_dir=args.output, device=device)
    for i, r in enumerate(results):
        where = f" (cut from {[round(v) for v in r.query_box_xyxy]})" if r.query_box_xyxy else ""
        print(f"patch {i}{where}: found at {[round(v) for v in r.box_xyxy]} score {r.score:.2f}")
    print(f"drawn in {args.output}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .models.official import convert_official_checkpoint, parse_overrides

    setup_logging(0, args.verbose)
    out = convert_official_checkpoint(args.src, args.dst, **parse_overrides(args.overrides))
    print(f"wrote {out}; use it with `updetr predict/eval/query --checkpoint {out}`")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import OPSET, export_onnx, load_for_export, onnx_session, parity

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
    from .serve import serve

    setup_logging(0, args.verbose)
    return serve(checkpoint=args.checkpoint, oneshot=args.oneshot, detector=args.detector, demo=args.demo,
                 host=args.host, port=args.port, device=args.device or "cpu", threads=args.threads)


# ----------------------------------------------------------------------------- data / demo
def cmd_data_embedded(args: argparse.Namespace) -> int:
    from .data.embedded import generate_embedded

    setup_logging(0, args.verbose)
    out = generate_embedded(
        args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
        num_unlabeled=args.num_unlabeled, image_size=(args.min_size, args.max_size),
        object_size=tuple(args.object_size), max_objects=args.max_objects, overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"embedded benchmark in {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    setup_logging(0, args.verbose)
    from .demo import DemoBudget, apply_budget_overrides

    budget = DemoBudget.quick() if args.quick else DemoBudget()
    budget = apply_budget_overrides(budget, args.budget)
    run_demo(args.output, device=args.device or "auto", progress=not args.no_progress, budget=budget)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import experiment_budget, run_experiment

    setup_logging(0, args.verbose)
    budget = experiment_budget(args.quick, args.budget)
    result = run_experiment(args.output, budget=budget, quick=args.quick, seeds=args.seeds, device=args.device or "auto",
                            progress=not args.no_progress)
    print(f"report: {result.report_dir / 'README.md'}")
    return 0


class _CommonSubparsers:
    """Adds the shared options (--verbose, --no-progress) to every subcommand."""

    def __init__(self, action, common: argparse.ArgumentParser):
        self.action, self.common = action, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.common], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="updetr", description="UP-DETR / DETR: pre-train, train, evaluate, predict.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="debug logging and full tracebacks")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = _CommonSubparsers(parser.add_subparsers(dest="command", required=True), common)

    p = sub.add_parser("train", help="train DETR on a COCO/VOC dataset (also under torchrun)")
    add_config_args(p)
    p.add_argument("--resume", help="continue exactly from a checkpoint.pth of this run")
    p.add_argument("--init-from", help="initialise from a pre-training or detection checkpoint (fine-tuning)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="UP-DETR pre-training on a folder of unlabelled images (also under torchrun)")
    add_config_args(p, default_preset="pretrain-small")
    p.add_argument("--images", help="folder tree of unlabelled images (searched recursively)")
    p.add_argument("--resume", help="continue exactly from a checkpoint.pth of this run")
    p.set_defaults(func=cmd_pretrain)

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

    from .cli_oneshot import add_oneshot_parser

    add_oneshot_parser(sub)
    from .cli_panoptic import add_panoptic_parser

    add_panoptic_parser(sub)

    p = sub.add_parser("query", help="find query patches in an image with a pre-trained UP-DETR model")
    p.add_argument("--checkpoint", required=True, help="pre-training checkpoint (ours or converted)")
    p.add_argument("--image", required=True)
    p.add_argument("--box", action="append", help="x,y,w,h of a patch cut from --image (repeatable)")
    p.add_argument("--exemplar", action="append", help="IMG or IMG:x,y,w,h, a patch from another image (repeatable)")
    p.add_argument("--output", default="query")
    p.add_argument("--device")
    p.set_defaults(func=cmd_query)

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

    from .data.embedded import DEFAULT_MAX_OBJECTS, DEFAULT_OBJECT_SIZE

    p = sub.add_parser("data", help="dataset utilities")
    dsub = _CommonSubparsers(p.add_subparsers(dest="data_command", required=True), common)
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

    p = sub.add_parser("demo", help="the main job: the paper's comparison on the embedded benchmark, offline")
    p.add_argument("--output", default="demo")
    p.add_argument("--quick", action="store_true", help="a tiny budget (seconds), to check the pipeline")
    p.add_argument("--budget", action="append", default=[], metavar="FIELD=VALUE",
                   help="change the demo budget (repeatable), e.g. finetune_epochs=12, seed=1, finetune=optim.lr=5e-4")
    p.add_argument("--device")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("experiment", help="the paper's tables at small scale, mean ± std over seeds (reuses demo stages)")
    p.add_argument("--output", default="experiment")
    p.add_argument("--quick", action="store_true", help="a tiny budget and 2 seeds (about a minute), to check the protocol")
    p.add_argument("--seeds", type=int, metavar="N", help="seeds 0..N-1 (default 3; 2 with --quick)")
    p.add_argument("--budget", action="append", default=[], metavar="FIELD=VALUE",
                   help="change the budget (repeatable), as for demo, e.g. finetune_epochs=4, pretrain_epochs=4")
    p.add_argument("--device")
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected failures (bad input, config, files, folders) print one line,
    ``updetr CMD: error: ...``, and return 2 (``--verbose`` shows the traceback instead); Ctrl-C
    at any point, start-up included, returns 130 without a traceback."""
    args = None
    try:
        parser = build_parser()  # imports torch: Ctrl-C here is an interruption too
        args = parser.parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"updetr{' ' + args.command if args else ''}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - user-facing errors become one clear line
        if isinstance(err, _known_errors()) and not getattr(args, "verbose", False):
            print(f"updetr {getattr(args, 'command', '')}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        raise


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input or an unusable file or folder, not a bug."""
    from .data.io import DataError
    from .serialization import CheckpointError
    from .engine.loop import TrainingStopped
    from .engine.run_folder import RunFolderError
    from .models.cnn import BackboneWeightsError

    return (ConfigError, CheckpointError, DataError, RunFolderError, TrainingStopped, BackboneWeightsError, ValueError,
            OSError)


def _one_line(err: BaseException) -> str:
    """The error as one line. An error re-raised from a DataLoader worker carries the worker's whole
    traceback: its last line is the cause. An OSError names its file."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = re.sub(r"^[\w.]+: ", "", last, count=1)  # "updetr.data.io.DataError: x.jpg: ..." -> "x.jpg: ..."
    elif isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
