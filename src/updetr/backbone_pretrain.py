"""The small-scale stand-in for the paper's ImageNet/SwAV CNN: a ResNet pre-trained on classification.

The paper starts both DETR and UP-DETR from a CNN pre-trained without detection labels.
At embedded-benchmark scale we do the same: a torchvision ResNet (ordinary BatchNorm) is
trained to classify single objects rendered on photo crops, using only the digit samples
the benchmark never draws (odd indices of ``load_digits``) and freshly drawn shapes. It
never sees a benchmark image or a detection label. The weights are then loaded into the
detector's frozen-BN backbone (running statistics become the frozen statistics).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from .data import embedded as emb
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .engine.checkpoint import save_checkpoint

log = logging.getLogger(__name__)

CLASSES = list(emb.EMBEDDED_THING_CLASSES)  # 10 digits + shapes: the classification labels


def render_classification_set(num: int, size: int = 64, seed: int = 0, photo_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` crops (N, 3, size, size) uint8, one object each, and labels (N,).

    Digits come only from :func:`updetr.data.embedded.reserved_digit_samples`. A
    ``photo_fraction`` of the crops has a photograph background, the rest a plain noisy
    colour (an easier start for a CNN trained from scratch in a minute).
    """
    rng = np.random.default_rng([seed, 7])
    assets = emb._load_assets()
    digits, digit_labels = emb.reserved_digit_samples()
    by_label = [np.flatnonzero(digit_labels == d) for d in range(10)]
    images = np.empty((num, size, size, 3), dtype=np.uint8)
    labels = rng.integers(len(CLASSES), size=num)
    for i, label in enumerate(labels):
        if rng.random() < photo_fraction:
            canvas = emb._background(rng, assets, size, size)
        else:
            canvas = np.broadcast_to(rng.uniform(0, 255, size=3).astype(np.float32), (size, size, 3)).copy()
        side = math.exp(rng.uniform(math.log(size * 0.3), math.log(size * 0.85)))
        h = w = max(8, round(side))
        if label < 10:
            alpha = emb._digit_alpha(rng, digits[rng.choice(by_label[label])], h, w)
        else:
            alpha = emb._shape_alpha(rng, CLASSES[label], h, w)
        ph, pw = alpha.shape
        y0, x0 = rng.integers(0, size - ph + 1), rng.integers(0, size - pw + 1)
        window = (slice(y0, y0 + ph), slice(x0, x0 + pw))
        colour = emb._object_colour(rng, canvas[window][alpha >= 0.5].mean(axis=0))
        canvas[window] += alpha[..., None] * (colour - canvas[window])
        canvas += rng.standard_normal(size=canvas.shape, dtype=np.float32) * 2.5
        images[i] = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def pretrain_backbone(
    out_path: str | Path,
    *,
    arch: str = "resnet18",
    num_images: int = 12000,
    size: int = 64,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Train ``arch`` to classify rendered objects; save its state dict (no ``fc``) to ``out_path``.

    Returns a summary with the held-out accuracy (also written next to the weights as JSON).
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    images, labels = render_classification_set(num_images, size, seed)
    val_images, val_labels = render_classification_set(1000, size, seed + 1)
    dev = torch.device(device)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=len(CLASSES)).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (num_images // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="CNN pre-training", disable=not progress, dynamic_ncols=True)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(num_images, generator=gen)
        for b in range(num_images // batch_size):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x = images[idx]  # no mirroring: a mirrored 2 or 7 is not a digit
            x = _normalise(x.to(dev)).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), labels[idx].to(dev), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(_normalise(val_images[i:i + 250].to(dev))).argmax(1).cpu() == val_labels[i:i + 250]).sum())
                      for i in range(0, len(val_images), 250))
    state = {k: v.cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    save_checkpoint(out_path, {"model": state, "arch": arch})
    summary = {"arch": arch, "num_images": num_images, "size": size, "epochs": epochs, "seed": seed,
               "val_accuracy": correct / len(val_images), "seconds": round(time.perf_counter() - start, 1)}
    Path(out_path).with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("CNN pre-training: held-out accuracy %.1f%% in %.0f s", 100 * summary["val_accuracy"], summary["seconds"])
    return summary
