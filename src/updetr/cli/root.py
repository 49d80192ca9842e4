"""The ``updetr`` command: the top-level parser, and one line for every expected failure.

Each subcommand lives in its own module of this package (:mod:`.detection`: train, eval, predict;
:mod:`.pretrain`: pretrain, query; :mod:`.oneshot`; :mod:`.panoptic`; :mod:`.tools`: convert, export, serve,
data; :mod:`.demo`: demo, experiment), which parses and prints; the work is in the library.
"""

from __future__ import annotations

import argparse
import re
import sys

from ..config import ConfigError
from ..data.io import DataError
from ..engine.loop import TrainingStopped
from ..engine.run_folder import RunFolderError
from ..models.cnn import BackboneWeightsError
from ..serialization import CheckpointError
from . import demo, detection, oneshot, panoptic, pretrain, tools
from .common import CommonSubparsers

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="updetr", description="UP-DETR / DETR: pre-train, train, evaluate, predict.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="debug logging and full tracebacks")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = CommonSubparsers(parser.add_subparsers(dest="command", required=True), common)
    # in the order `updetr --help` lists them
    for module in (detection, pretrain, oneshot, panoptic, tools, demo):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected failures (bad input, config, files, folders) print one line,
    ``updetr CMD: error: ...``, and return 2 (``--verbose`` shows the traceback instead); Ctrl-C
    at any point, start-up included, returns 130 without a traceback."""
    args = None
    try:
        parser = build_parser()
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
