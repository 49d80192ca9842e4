"""Training-step throughput, fraction of the fp32 matmul peak, and batch-1 inference latency.

    python benchmarks/train_step.py [--recipes small r50] [--steps 5] [--threads N] [--hf]

For each recipe: images/s of a full training step (forward, set loss with Hungarian
matching on every decoder layer, backward, clipping, AdamW), the step's FLOPs counted
with ``torch.utils.flop_counter.FlopCounterMode``, and the fraction of this machine's
fp32 matmul peak (a large square matmul timed in the same run) the step reaches.
``--hf`` also times Hugging Face transformers' DETR at batch 1 for the same
architecture when ``transformers`` is installed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from updetr.config import make_config
from updetr.engine.loop import build_optimizer
from updetr.losses.criterion import build_criterion
from updetr.models import build_detr

RECIPES = {
    # name: (preset, overrides, batch, image side)
    "small": ("small", ["model.num_queries=30"], 8, 256),
    "r50": ("r50", [], 2, 512),
}


def matmul_peak(threads: int, n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def fake_targets(batch: int, num_classes: int, gen: torch.Generator) -> list[dict]:
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append({"boxes": torch.cat([centre, size], 1), "labels": torch.randint(num_classes, (n,), generator=gen),
                        "iscrowd": torch.zeros(n, dtype=torch.int64)})
    return targets


def bench_recipe(name: str, steps: int) -> dict:
    preset, overrides, batch, side = RECIPES[name]
    cfg = make_config(preset, overrides=overrides)
    num_classes = 20
    model = build_detr(cfg.model, num_classes, train_backbone=cfg.optim.lr_backbone > 0)
    criterion = build_criterion(cfg.loss, num_classes)
    optimizer, _ = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, side, side, generator=gen)
    targets = fake_targets(batch, num_classes, gen)

    def step() -> None:
        out = model(images)
        loss = criterion(out, targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_max_norm)
        optimizer.step()

    model.train()
    with FlopCounterMode(display=False) as counter:
        out = model(images)
        criterion(out, targets)["loss"].backward()
    flops = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)
    step()  # warm-up (oneDNN primitive creation)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)

    model.eval()
    one = images[:1]
    with torch.inference_mode():
        model(one)
        lat = []
        for _ in range(max(3, steps)):
            t0 = time.perf_counter()
            model(one)
            lat.append(time.perf_counter() - t0)
    return {"recipe": name, "batch": batch, "side": side, "step_s": step_s, "images_per_s": batch / step_s,
            "gflop_per_step": flops / 1e9, "achieved_gflops": flops / step_s / 1e9,
            "latency_ms": 1000 * statistics.median(lat), "cfg": cfg}


def bench_hf(cfg, side: int, repeats: int = 5) -> float | None:
    try:
        from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    except ImportError:
        return None
    depths = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}
    m = cfg.model
    bottleneck = m.backbone in ("resnet50", "resnet101")
    backbone = ResNetConfig(depths=depths[m.backbone], layer_type="bottleneck" if bottleneck else "basic",
                            hidden_sizes=[256, 512, 1024, 2048] if bottleneck else [64, 128, 256, 512], out_features=["stage4"])
    hf_cfg = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=m.hidden_dim,
                        encoder_layers=m.enc_layers, decoder_layers=m.dec_layers, encoder_attention_heads=m.num_heads,
                        decoder_attention_heads=m.num_heads, encoder_ffn_dim=m.ffn_dim, decoder_ffn_dim=m.ffn_dim,
                        num_queries=m.num_queries, num_labels=20)
    model = DetrForObjectDetection(hf_cfg).eval()
    x = torch.randn(1, 3, side, side)
    with torch.inference_mode():
        model(pixel_values=x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(pixel_values=x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--hf", action="store_true", help="also time Hugging Face DETR at batch 1 (needs transformers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (4096² matmul)\n")
    print("| recipe | batch × side | step (s) | images/s | GFLOP/step | achieved GFLOP/s | % of peak | latency b=1 (ms) | HF DETR b=1 (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.recipes:
        r = bench_recipe(name, args.steps)
        hf = bench_hf(r["cfg"], r["side"]) if args.hf else None
        print(f"| {name} | {r['batch']} × {r['side']}² | {r['step_s']:.2f} | {r['images_per_s']:.1f} | {r['gflop_per_step']:.1f} | "
              f"{r['achieved_gflops']:.1f} | {100 * r['achieved_gflops'] * 1e9 / peak:.0f} % | {r['latency_ms']:.0f} | "
              f"{'n/a' if hf is None else f'{hf:.0f}'} |")


if __name__ == "__main__":
    main()
