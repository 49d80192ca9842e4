"""``updetr serve``: a local web page to try the models by drawing a box on a photograph.

Draw a box with the mouse: the pre-trained UP-DETR model finds that patch (random query patch detection, the
pretext task) in the same or another picture; a one-shot model, when given, finds every object of the same
kind; a detector, when given, shows its detections with class names. A threshold slider filters the boxes
live, and every answer says how long the model took.

With no checkpoint flags the page uses what ``updetr demo`` wrote (:func:`find_demo_checkpoints`).
"""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..stages import is_done
from .images import PictureStore
from .models import ServeModels

__all__ = ["DemoCheckpoints", "address_note", "find_demo_checkpoints", "build_app", "serve"]


@dataclass
class DemoCheckpoints:
    pretrain: Path | None = None
    oneshot: Path | None = None
    detector: Path | None = None
    benchmark_images: list[Path] | None = None


def _newest_done(stages: Path, prefix: str, want=lambda folder: True) -> Path | None:
    """The newest finished stage ``stages/<prefix>-<hash>`` (with DONE and checkpoint.pth) that ``want``s."""
    found = [d for d in stages.glob(f"{prefix}-*") if is_done(d) and (d / "checkpoint.pth").is_file() and want(d)]
    return max(found, key=lambda d: (d / "checkpoint.pth").stat().st_mtime) / "checkpoint.pth" if found else None


def _from_pretraining(run: Path) -> bool:
    try:
        return bool(json.loads((run / "config.json").read_text()).get("init_from"))
    except (OSError, ValueError):
        return False


def find_demo_checkpoints(demo: str | Path = "demo") -> DemoCheckpoints:
    """The checkpoints of ``updetr demo --output DEMO`` (the newest finished ones when several budgets ran):
    ``stages/pretrain-*`` (query patches), ``stages/updetr-*`` (the fine-tuned UP-DETR detector),
    ``stages/oneshot-*`` initialised from the pre-training (only with ``--budget oneshot_epochs=N``), and a few
    validation images of ``stages/data-*``."""
    stages = Path(demo) / "stages"
    found = DemoCheckpoints()
    if not stages.is_dir():
        return found
    found.pretrain = _newest_done(stages, "pretrain")
    found.detector = _newest_done(stages, "updetr")
    found.oneshot = _newest_done(stages, "oneshot", _from_pretraining)
    data = sorted((d for d in stages.glob("data-*") if (d / "val").is_dir()), key=lambda d: d.stat().st_mtime)
    if data:
        found.benchmark_images = sorted((data[-1] / "val").glob("*.jpg"))[:6]
    return found


def address_note(host: str, port: int) -> str:
    """Where the page is and who can reach it: loopback addresses are this machine only; anything else is not."""
    shown = f"[{host}]" if ":" in host else host
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    where = ("this machine only; --host 0.0.0.0 shares it with the network" if local
             else "reachable from the network: anyone who can reach this address can use the models")
    return f"open http://{shown}:{port}/ (bound to {host}: {where})"


def build_app(checkpoint=None, oneshot=None, detector=None, *, device: str = "cpu", benchmark_images=None):
    """The Starlette application for these checkpoints (what :func:`serve` runs; tests drive it directly)."""
    from .app import create_app  # starlette: the optional `serve` extra

    models = ServeModels(checkpoint, oneshot, detector, device=device)
    return create_app(models, PictureStore(benchmark_images))


def serve(*, checkpoint=None, oneshot=None, detector=None, demo: str | Path = "demo", host: str = "127.0.0.1",
          port: int = 8000, device: str = "cpu", threads: int | None = None) -> int:
    """Load the models, print what is used and where the page is, and serve until Ctrl-C."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ConfigError(f"updetr serve needs the web server packages ({err.name} is missing): "
                          "pip install 'updetr[serve]' (or pip install -e '.[serve]' in a clone)") from None

    benchmark = None
    if not (checkpoint or oneshot or detector):
        found = find_demo_checkpoints(demo)
        if not (found.pretrain or found.detector or found.oneshot):
            raise ConfigError(f"no checkpoint given and no finished demo in {demo}/stages: run `updetr demo` first "
                              f"(or `updetr demo --quick` for a toy one in seconds), or pass --checkpoint PRE.pth "
                              "[--oneshot ONESHOT.pth] [--detector DET.pth]")
        checkpoint, oneshot, detector, benchmark = found.pretrain, found.oneshot, found.detector, found.benchmark_images
        print(f"updetr serve: using the demo's checkpoints in {demo}/stages:")
        for what, path in (("query patches (pre-training)", checkpoint), ("one-shot", oneshot),
                           ("detector (fine-tuned UP-DETR)", detector)):
            hint = " (none: add --budget oneshot_epochs=7 to the demo)" if what == "one-shot" else " (none)"
            print(f"  {what}: {path if path else hint.strip()}")
    if threads:
        torch.set_num_threads(threads)
    app = build_app(checkpoint, oneshot, detector, device=device, benchmark_images=benchmark)
    print(f"updetr serve: {address_note(host, port)}; Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    sys.stdout.flush()
    return 0
