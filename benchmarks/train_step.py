"""Training-step throughput, fraction of the fp32 matmul peak, and batch-1 inference latency.

    python benchmarks/train_step.py [--recipes small r50] [--steps 5] [--threads N] [--hf] [--breakdown]
    python benchmarks/train_step.py --device cuda [--amp bf16] [--batch-scale 4] --steps 20

Recipes: ``small`` and ``r50`` (DETR), ``pretrain-small`` (UP-DETR pre-training with the small
architecture: frozen CNN, query patches, group matching, feature reconstruction). For each recipe:
images/s of a full training step (forward, set loss with Hungarian matching on every decoder
layer, backward, clipping, AdamW), the step's FLOPs counted
with ``torch.utils.flop_counter.FlopCounterMode``, and the fraction of this machine's
fp32 matmul peak (a large square matmul timed in the same run) the step reaches. On CUDA
the peak is measured in the step's precision (fp32 without TF32, or the ``--amp`` dtype).
``--hf`` also times Hugging Face transformers' DETR at batch 1 for the same
architecture when ``transformers`` is installed. ``--breakdown`` also profiles the step and
prints, per operator group, its FLOPs, its time and the fraction of the peak it runs at, and
the time spent in operators that do no counted FLOPs (element-wise, copies, optimizer, matching).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from updetr.presets import make_config
from updetr.engine.epoch import _float_output, autocast_context, build_optimizer, optimizer_step
from updetr.engine.pretrain import PretrainTask
from updetr.losses.criterion import build_criterion
from updetr.models import build_detr

RECIPES = {
    # name: (preset, overrides, batch, image side)
    "small": ("small", ["model.num_queries=30"], 8, 256),
    "r50": ("r50", [], 2, 512),
    # UP-DETR pre-training with the small architecture: frozen CNN (no autograd for image or patches), M query
    # patches of the preset's query size per image, group matching, feature reconstruction
    "pretrain-small": ("pretrain-small", ["pretrain.group_matching=true"], 8, 256),
    # the demo's recipes: the packaged ImageNet EfficientNet-Lite0, frozen, 10 queries, M = 5 patches of 48^2
    "embedded": ("embedded", [], 8, 224),
    "pretrain-embedded": ("pretrain-embedded", [], 8, 224),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 4096, repeats: int = 5) -> float:
    if device.type == "cuda":
        n, repeats = 8192, 20
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def fake_targets(batch: int, num_classes: int, gen: torch.Generator, num_boxes: int | None = None) -> list[dict]:
    """Random boxes inside the image (1-8 per image, or ``num_boxes``) with random labels."""
    targets = []
    for _ in range(batch):
        n = num_boxes if num_boxes is not None else int(torch.randint(1, 9, (1,), generator=gen))
        centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append({"boxes_cxcywh": torch.cat([centre, size], 1), "labels": torch.randint(num_classes, (n,), generator=gen),
                        "iscrowd": torch.zeros(n, dtype=torch.int64)})
    return targets


# FLOP-counter operator -> the profiler events that do its work
_GROUPS = {
    "convolution": ("convolution", ("aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_convolution")),
    "convolution backward": ("convolution_backward", ("aten::convolution_backward",)),
    "matmul (mm/addmm/bmm)": (("mm", "addmm", "bmm"), ("aten::mm", "aten::addmm", "aten::bmm")),
    "attention": (("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"),
                  ("aten::_scaled_dot_product_flash_attention_for_cpu",
                   "aten::_scaled_dot_product_flash_attention_for_cpu_backward")),
}


def breakdown(step, counts: dict, steps: int, peak: float) -> list[tuple[str, float, float, float | None]]:
    """(group, GFLOP per step, ms per step, fraction of peak) from a profile of ``steps`` steps."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            step()
    self_s = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}
    flops = {getattr(op, "__name__", str(op)).split(".")[0]: n for op, n in counts.items()}
    rows, claimed = [], set()
    for group, (flop_names, events) in _GROUPS.items():
        names = (flop_names,) if isinstance(flop_names, str) else flop_names
        f = sum(flops.get(n, 0) for n in names)
        t = sum(self_s.get(e, 0.0) for e in events)
        claimed.update(events)
        rows.append((group, f / 1e9, 1000 * t, f / t / peak if t > 0 and f > 0 else None))
    rest = sum(v for k, v in self_s.items() if k not in claimed and not k.startswith(("ProfilerStep", "autograd::", "Optimizer.")))
    rows.append(("everything else (no counted FLOPs)", 0.0, 1000 * rest, None))
    return rows


def bench_recipe(name: str, steps: int, device: torch.device = torch.device("cpu"), amp: str = "none",
                 batch_scale: int = 1, peak: float | None = None) -> dict:
    preset, overrides, batch, side = RECIPES[name]
    batch *= batch_scale
    cfg = make_config(preset, overrides=overrides)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, side, side, generator=gen).to(device)
    inputs: tuple[torch.Tensor, ...] = (images,)
    if preset.startswith("pretrain"):
        task = PretrainTask(cfg)
        model, criterion = task.build_model().to(device), task.build_criterion().to(device)
        m, q = cfg.pretrain.num_patches, cfg.pretrain.query_size
        inputs = (images, torch.randn(batch, m, 3, q, q, generator=gen).to(device))
        # one class (the patch), M boxes per image, box i found by query group i
        targets = [{**t, "patch_index": torch.arange(m)} for t in fake_targets(batch, 1, gen, num_boxes=m)]
    else:
        num_classes = 20
        model = build_detr(cfg.model, num_classes, train_backbone=cfg.optim.lr_backbone > 0).to(device)
        criterion = build_criterion(cfg.loss, num_classes).to(device)
        targets = fake_targets(batch, num_classes, gen)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    optimizer, _ = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def step() -> None:
        with autocast_context(device, amp):
            out = model(*inputs)
        loss = criterion(_float_output(out), targets)["loss"]
        optimizer_step(loss, model, optimizer, cfg.optim.clip_max_norm, scaler)

    model.train()
    with FlopCounterMode(display=False) as counter:
        with autocast_context(device, amp):
            out = model(*inputs)
        criterion(_float_output(out), targets)["loss"].backward()
    flops = counter.get_total_flops()
    op_counts = counter.get_flop_counts().get("Global", {})
    optimizer.zero_grad(set_to_none=True)
    step()  # warm-up (oneDNN primitive creation / cuDNN autotuning)
    step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)

    model.eval()
    one = tuple(x[:1] for x in inputs)
    with torch.inference_mode(), autocast_context(device, amp):
        model(*one)
        lat = []
        for _ in range(max(3, steps)):
            _sync(device)
            t0 = time.perf_counter()
            model(*one)
            _sync(device)
            lat.append(time.perf_counter() - t0)
    model.train()
    rows = breakdown(step, op_counts, steps, peak) if peak and device.type == "cpu" else None
    return {"recipe": name, "batch": batch, "side": side, "step_s": step_s, "images_per_s": batch / step_s,
            "gflop_per_step": flops / 1e9, "achieved_gflops": flops / step_s / 1e9,
            "latency_ms": 1000 * statistics.median(lat), "cfg": cfg, "breakdown": rows}


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
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype (CUDA only)")
    parser.add_argument("--batch-scale", type=int, default=1, help="multiply each recipe's batch (GPUs)")
    parser.add_argument("--breakdown", action="store_true", help="profile the step: time and %% of peak per operator group (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    peak = matmul_peak(device, dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {where}, {dtype} matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| recipe | batch × side | step (s) | images/s | GFLOP/step | achieved GFLOP/s | % of peak | latency b=1 (ms) | HF DETR b=1 (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    details = []
    for name in args.recipes:
        r = bench_recipe(name, args.steps, device, args.amp, args.batch_scale, peak if args.breakdown else None)
        if r["breakdown"]:
            details.append((name, r["breakdown"]))
        hf = bench_hf(r["cfg"], r["side"]) if args.hf and device.type == "cpu" and not RECIPES[name][0].startswith("pretrain") else None
        print(f"| {name} | {r['batch']} × {r['side']}² | {r['step_s']:.2f} | {r['images_per_s']:.1f} | {r['gflop_per_step']:.1f} | "
              f"{r['achieved_gflops']:.1f} | {100 * r['achieved_gflops'] * 1e9 / peak:.0f} % | {r['latency_ms']:.0f} | "
              f"{'n/a' if hf is None else f'{hf:.0f}'} |")
    for name, rows in details:
        print(f"\n{name}: where a training step's time goes (profiled, {args.steps} steps)\n")
        print("| operators | GFLOP/step | ms/step | % of peak |")
        print("|---|---|---|---|")
        for group, gflop, ms, frac in rows:
            print(f"| {group} | {gflop:.1f} | {ms:.0f} | {'–' if frac is None else f'{100 * frac:.0f} %'} |")


if __name__ == "__main__":
    main()
