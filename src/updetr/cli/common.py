"""What every ``updetr`` subcommand shares: the shared flags, logging set-up and the configuration flags of training
commands. The modules of :mod:`updetr.cli` import these; nothing below the command line does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..config import Config
from ..presets import PRESETS, make_config
from ..data.embedded import embedded_data_overrides
from ..engine.distributed import cleanup, init_distributed
from ..engine.loop import FitResult, fit
from ..engine.tasks import build_task

__all__ = ["CommonSubparsers", "add_config_args", "config_from_args", "flag_overrides", "setup_logging", "train"]


class CommonSubparsers:
    """A subparsers action that gives every subcommand the shared options (``--verbose``, ``--no-progress``)."""

    def __init__(self, action, common: argparse.ArgumentParser):
        self.action, self.common = action, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.common], **kwargs)

    def nested(self, action) -> "CommonSubparsers":
        """The same for the subcommands of a subcommand (``updetr data embedded``, ``updetr oneshot train``)."""
        return CommonSubparsers(action, self.common)


def setup_logging(rank: int = 0, verbose: bool = False) -> None:
    """Log to stderr: INFO (DEBUG with ``verbose``) on rank 0, warnings only on the other ranks."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "small") -> None:
    """The configuration flags of a training command (``--preset``, ``--config``, ``--set``, ...); read them
    back with :func:`config_from_args`."""
    g = p.add_argument_group("configuration (preset, then --config file, then flags, then --set)")
    g.add_argument("--preset", default=default_preset, choices=sorted(PRESETS), help=f"base recipe (default {default_preset})")
    g.add_argument("--config", help="JSON file with config values (partial is fine)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config value, e.g. --set model.hidden_dim=128 (repeatable)")
    g.add_argument("--data-root", help="dataset root (COCO layout by default; see --format)")
    g.add_argument("--format", choices=["coco", "voc"], help="dataset format of --data-root")
    g.add_argument("--embedded", metavar="DIR", help="use the embedded benchmark generated in DIR (updetr data embedded DIR)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--output", help="run folder (checkpoints, config.json, metrics.jsonl)")
    g.add_argument("--device", help="auto | cpu | cuda")
    g.add_argument("--backbone-weights", help="none | imagenet | swav | path to a local .pth")
    g.add_argument("--seed", type=int)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides a command's flags stand for (``--embedded``, ``--data-root``, ...), then ``--set``."""
    overrides: list[str] = []
    if getattr(args, "embedded", None):
        overrides += embedded_data_overrides(args.embedded)
    simple = {
        "data_root": "data.root", "format": "data.format", "epochs": "optim.epochs", "batch_size": "data.batch_size",
        "output": "output_dir", "device": "device", "backbone_weights": "model.backbone_weights", "seed": "seed",
        "init_from": "init_from",
    }
    for attr, key in simple.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return overrides + list(getattr(args, "overrides", None) or [])


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of a command's flags; for training commands (those with ``--resume``) with the
    run folder resolved too (:func:`_resolve_run_folder`)."""
    cfg = make_config(args.preset, args.config, flag_overrides(args))
    if hasattr(args, "resume"):
        cfg = _resolve_run_folder(cfg, args)
    return cfg


def _resolve_run_folder(cfg: Config, args: argparse.Namespace) -> Config:
    """Where a training command writes, when ``--output`` (or ``output_dir`` in ``--set`` or
    ``--config``) does not say: with ``--resume``, the folder of the run resumed; otherwise the
    preset's default folder, or the first free numbered one next to it (``runs/small-2``, ...)
    when an earlier run holds it. An explicit folder is used as given (a fresh run refuses an
    occupied one, see ``updetr.engine.run_folder``)."""
    default = PRESETS[args.preset]().output_dir
    explicit = (getattr(args, "output", None) is not None or cfg.output_dir != default
                or any(o.split("=", 1)[0].strip() == "output_dir" for o in args.overrides))
    if explicit:
        return cfg
    if args.resume:
        resume = Path(args.resume)
        folder = resume if resume.is_dir() or not resume.suffix else resume.parent
        return cfg.override([f"output_dir={json.dumps(str(folder))}"])
    folder, n = Path(default), 2
    while folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        folder, n = Path(f"{default}-{n}"), n + 1
    if str(folder) != default:
        print(f"updetr: {default} holds an earlier run; this run writes to {folder} (--output DIR names the folder)",
              file=sys.stderr)
    return cfg.override([f"output_dir={json.dumps(str(folder))}"])


def train(task: str, cfg: Config, args: argparse.Namespace) -> tuple[FitResult, bool]:
    """Train the task named ``task`` with ``cfg`` in this process (alone, or one rank under torchrun): logging for
    this rank, the process group around ``fit``. Returns the result and whether this is the process that prints."""
    dist_info = init_distributed(cfg.device)
    setup_logging(dist_info.rank, args.verbose)
    try:
        result = fit(build_task(task, cfg), cfg, dist_info, resume=args.resume, progress=not args.no_progress)
    finally:
        cleanup()
    return result, dist_info.is_main

