"""ONNX Runtime next to PyTorch: batch-1 latency of the exported models, and their max abs difference.

    python benchmarks/onnx_latency.py [--checkpoint DET.pth --checkpoint PRE.pth] [--threads 1 2] [--runs 30]
        [--out benchmarks/results/onnx_latency.txt]

Without ``--checkpoint`` it times the embedded recipe's detector and pre-training model (the demo's: the packaged
ImageNet EfficientNet-Lite0, D=128, 3+3 pre-norm layers, Q=10, M=5) with random transformer weights; the time does
not depend on the weights. Each model is exported with ``updetr export`` (TorchScript exporter, opset 17) and run at
the evaluation sizes of a square and a 3:2 photograph (224x224, 224x336). PyTorch runs the model's own forward in
inference mode; ONNX Runtime runs the CPU provider with the same number of intra-op threads. Median and
interquartile range over ``--runs`` runs after 3 warm-up runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _time(fn, runs: int) -> dict[str, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    q = statistics.quantiles(times, n=4)
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2]}


def _embedded_checkpoints(folder: Path) -> list[Path]:
    from updetr.presets import make_config
    from updetr.engine.checkpoint import save_checkpoint
    from updetr.models import build_detr, build_updetr

    torch.manual_seed(0)
    cfg = make_config("embedded")  # the packaged ImageNet Lite0 weights: offline
    det = build_detr(cfg.model, 14)
    cfg.model.backbone_weights = "none"
    save_checkpoint(folder / "detector.pth", {"model": det.state_dict(), "config": cfg.to_dict(), "task": "detection",
                                              "classes": [f"class_{i}" for i in range(14)]})
    pre_cfg = make_config("pretrain-embedded")
    pre = build_updetr(pre_cfg.model, pre_cfg.pretrain)
    pre_cfg.model.backbone_weights = "none"
    save_checkpoint(folder / "pretrain.pth", {"model": pre.state_dict(), "config": pre_cfg.to_dict(), "task": "pretrain"})
    return [folder / "detector.pth", folder / "pretrain.pth"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", help="checkpoint(s) to time (default: the embedded recipe's)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--sizes", default="224x224,224x336")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)

    import onnxruntime

    from updetr.export import OPSET, export_onnx, load_for_export, onnx_session, parity

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    lines = [f"# python benchmarks/onnx_latency.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
             f"# torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, opset {OPSET}, "
             f"{platform.processor() or platform.machine()}, batch 1, median [q1-q3] of {args.runs} runs (ms)", "",
             "| model | size | threads | PyTorch (ms) | ONNX Runtime (ms) | ORT / PyTorch | max abs diff logits / boxes |",
             "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = [Path(c) for c in args.checkpoint] if args.checkpoint else _embedded_checkpoints(Path(tmp))
        for checkpoint in checkpoints:
            exported = load_for_export(checkpoint)
            onnx_file = export_onnx(exported, Path(tmp) / f"{checkpoint.stem}.onnx")
            name = f"{exported.task} ({checkpoint.name if args.checkpoint else 'embedded recipe'})"
            for threads in args.threads:
                torch.set_num_threads(threads)
                session = onnx_session(onnx_file, threads=threads)
                feeds_names = [i.name for i in session.get_inputs()]
                for height, width in sizes:
                    inputs = exported.example_inputs(height, width, batch=1)
                    feeds = {n: t.numpy() for n, t in zip(feeds_names, inputs)}
                    torch_ms = _time(lambda: exported.reference(inputs), args.runs)
                    ort_ms = _time(lambda: session.run(None, feeds), args.runs)
                    (diff,) = parity(exported, session, [(height, width)], batch=1)
                    lines.append(
                        f"| {name} | {height}x{width} | {threads} | {torch_ms['median']:.1f} [{torch_ms['q1']:.1f}-"
                        f"{torch_ms['q3']:.1f}] | {ort_ms['median']:.1f} [{ort_ms['q1']:.1f}-{ort_ms['q3']:.1f}] | "
                        f"{ort_ms['median'] / torch_ms['median']:.2f} | {diff['logits']:.1e} / {diff['boxes']:.1e} |")
                    print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
