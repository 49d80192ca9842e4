"""How fast the frozen CNN's maps are cached by each ``data.feature_engine``, measured side by side.

    python benchmarks/feature_engine.py RUN_FOLDER [--images 300] [--num-workers 0] [--out FILE]

RUN_FOLDER is a detection run (its ``config.json``: benchmark, CNN, sizes), e.g. a demo stage
``demo/stages/detr-*``. Two processes run at once, one thread each, as the demo's stages do: one caches the first
``--images`` training images (and their mirrors) with PyTorch, the other the same images with ONNX Runtime, each
into an empty store of its own, and each then reads its store back (what a later stage does). Printed (and
written to ``--out``): views per second computed and re-read for each engine, and the ratio. ``--num-workers``:
the images are decoded by that many DataLoader processes (0: in the measuring process, as the demo's stages do).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from updetr.config import Config
from updetr.data.feature_cache import CachedDetection
from updetr.engine.detection import DetectionTask


def measure(run: Path, engine: str, images: int, store: str, num_workers: int = 0) -> dict:
    """One engine, this process, one thread: views/s computing into an empty store, then re-reading it."""
    torch.set_num_threads(1)
    cfg = Config.load(run / "config.json")
    task = DetectionTask(cfg)
    subset = Subset(task.train_dataset(), range(images))
    task.val_dataset()
    model = task.build_model()
    rates = {}
    for what in ("compute", "reread"):
        start = time.perf_counter()
        CachedDetection(subset, model, torch.device("cpu"), hflip=0.5, num_workers=num_workers, progress=False,
                        store_dir=store, engine=engine)
        rates[what] = 2 * images / (time.perf_counter() - start)
    return {"engine": engine, **rates}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.run / "config.json").is_file():
        parser.error(f"{args.run}: no config.json (give a detection run folder, e.g. demo/stages/detr-*)")
    if args.one:
        print(json.dumps(measure(args.run, args.one, args.images, args.store, args.num_workers)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        children = [subprocess.Popen([sys.executable, __file__, str(args.run), "--images", str(args.images),
                                      "--num-workers", str(args.num_workers), "--one", engine,
                                      "--store", str(Path(tmp) / engine)], stdout=subprocess.PIPE, text=True)
                    for engine in ("torch", "onnxruntime")]
        results = {}
        for child in children:
            out, _ = child.communicate()
            if child.returncode:
                raise SystemExit(f"a measuring process failed (exit {child.returncode})")
            record = json.loads(out.strip().splitlines()[-1])
            results[record["engine"]] = record
    lines = [f"{args.images} images and their mirrors, two one-thread processes side by side, "
             f"{args.num_workers} loader processes each ({args.run})"]
    for engine, r in results.items():
        lines.append(f"{engine:12s} compute {r['compute']:6.1f} views/s   re-read {r['reread']:6.1f} views/s")
    lines.append(f"onnxruntime / torch: compute {results['onnxruntime']['compute'] / results['torch']['compute']:.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
