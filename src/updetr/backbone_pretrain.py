"""The small-scale stand-in for the paper's ImageNet/SwAV CNN: a ResNet pre-trained on classification.

The paper starts both DETR and UP-DETR from a CNN pre-trained without detection labels.
At embedded-benchmark scale we do the same: a torchvision ResNet (ordinary BatchNorm) is
trained to classify single objects rendered on photo crops, using only the digit samples
the benchmark never draws (odd indices of ``load_digits``) and freshly drawn shapes. It
never sees a benchmark image or a detection label. The weights are then loaded into the
detector's frozen-BN backbone (running statistics become the frozen statistics).

A classifier of isolated crops gives poor features *inside a scene*: a linear probe on the stride-32
cell at an object's centre reads its class for only ~20 % of the objects of a benchmark-like scene,
although the same CNN classifies 93 % of isolated crops. An ImageNet CNN, by contrast, is known to
carry object identity at every location of a photograph. The optional scene phase (``scene_steps``)
gives the small CNN that property: it continues training on scenes composed from the same reserved
material, predicting at every stride-8 cell the class of the object whose box covers it
(:func:`updetr.data.embedded.render_reserved_class_maps`); the probe then reads ~67 %.

An optional last phase (``context_steps``) trains the same CNN on reserved scenes so that the pooled
feature of a resized crop resembles the scene's own features where the crop came from
(:func:`crop_context_loss`): the property UP-DETR's query patches rely on, which a classifier lacks
(``benchmarks/patch_probe.py`` measures it).
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
SCENE_IMAGES, SCENE_BATCH = 3000, 32  # the scene phase's defaults: scenes rendered, scenes per step


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


def crop_context_loss(trunk: torch.nn.Module, scenes: torch.Tensor, boxes_per_image: int, crop_size: int,
                      gen: torch.Generator, temperature: float = 0.1,
                      fmap: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """InfoNCE between the pooled feature of resized crops and the image's own features over the same boxes.

    ``scenes``: normalised (B, 3, S, S). For each of ``boxes_per_image`` random boxes per scene (sides 12 px to
    S, any aspect ratio), the crop resized to ``crop_size``² goes through ``trunk`` and is average-pooled (what
    UP-DETR does to a query patch); the scene's feature map is pooled over the box (``roi_align``). Each crop
    must pick its own box among all boxes of the batch. ``fmap``: ``trunk(scenes)`` when the caller has it already.
    Returns the loss and the fraction picked right.
    """
    from torchvision.ops import roi_align

    batch, _, height, width = scenes.shape
    n = batch * boxes_per_image
    side = torch.empty(n, 2).uniform_(math.log(12), math.log(min(height, width)), generator=gen).exp()
    corner = torch.rand(n, 2, generator=gen) * (torch.tensor([width, height]) - side)
    rois = torch.cat([torch.arange(batch).repeat_interleave(boxes_per_image)[:, None].float(), corner, corner + side], 1)
    rois = rois.to(scenes.device)
    crops = roi_align(scenes, rois, output_size=crop_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    fmap = trunk(scenes) if fmap is None else fmap
    stride = height / fmap.shape[-2]
    in_place = roi_align(fmap, rois, output_size=1, spatial_scale=1.0 / stride, sampling_ratio=4, aligned=True).flatten(1)
    crop_features = trunk(crops.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))
    logits = F.normalize(crop_features, dim=1) @ F.normalize(in_place, dim=1).t() / temperature
    target = torch.arange(n, device=scenes.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    return loss, float((logits.argmax(1) == target).float().mean())


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
    scene_steps: int = 0,
    scene_images: int = SCENE_IMAGES,
    scene_size: int = 128,
    scene_batch: int = SCENE_BATCH,
    scene_lr: float = 1e-3,
    scene_object_size: tuple[float, float] = emb.DEFAULT_OBJECT_SIZE,
    scene_max_objects: int = emb.DEFAULT_MAX_OBJECTS,
    scene_context_weight: float = 0.0,
    context_steps: int = 0,
    context_scenes: int = 1600,
    context_size: int = 128,
    context_batch: int = 16,
    context_boxes: int = 8,
    context_lr: float = 1e-3,
) -> dict:
    """Train ``arch`` to classify rendered objects; save its state dict (no ``fc``) to ``out_path``.

    With ``scene_steps`` > 0 the scene phase follows (:func:`_scene_phase`): ``scene_images`` reserved scenes of
    ``scene_size``² pixels with objects drawn as the benchmark draws them (``scene_object_size``,
    ``scene_max_objects``), ``scene_steps`` steps of ``scene_batch`` scenes, with the crop-context loss
    (``size``² crops) added at ``scene_context_weight`` when that is > 0.

    With ``context_steps`` > 0 a last phase follows on ``context_scenes`` reserved scenes
    (:func:`updetr.data.embedded.render_reserved_scenes`, ``context_size``² pixels): :func:`crop_context_loss`
    with ``size``² crops, so that a resized crop's pooled feature resembles the scene's own features where the
    crop came from — the property of the paper's SwAV CNN that UP-DETR's query patches rely on.

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
            _train_step(F.cross_entropy(model(x), labels[idx].to(dev), label_smoothing=0.1), opt, sched, bar)
    bar.close()
    model.eval()
    with torch.no_grad():  # measured before the crop-context phase, which leaves the classifier head behind
        correct = sum(int((model(_normalise(val_images[i:i + 250].to(dev))).argmax(1).cpu() == val_labels[i:i + 250]).sum())
                      for i in range(0, len(val_images), 250))
    scene = {}
    if scene_steps > 0:
        scene = _scene_phase(model, scene_steps, scene_images, scene_size, scene_batch, scene_lr, scene_object_size,
                             scene_max_objects, seed, dev, progress, context_weight=scene_context_weight,
                             crop_size=size)
    context = {}
    if context_steps > 0:
        context = _context_phase(model, context_steps, context_scenes, context_size, context_batch, context_boxes,
                                 size, context_lr, seed, dev, progress)
        model.eval()
    state = {k: v.cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    save_checkpoint(out_path, {"model": state, "arch": arch})
    summary = {"arch": arch, "num_images": num_images, "size": size, "epochs": epochs, "seed": seed,
               "val_accuracy": correct / len(val_images), **scene, **context, "seconds": round(time.perf_counter() - start, 1)}
    Path(out_path).with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("CNN pre-training: held-out accuracy %.1f%% in %.0f s", 100 * summary["val_accuracy"], summary["seconds"])
    return summary


def _train_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                bar: tqdm) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.update()


def _scene_phase(model: torch.nn.Module, steps: int, num_scenes: int, scene_size: int, batch: int, lr: float,
                 object_size: tuple[float, float], max_objects: int, seed: int, dev: torch.device,
                 progress: bool, context_weight: float = 0.0, context_boxes: int = 4, crop_size: int = 32) -> dict:
    """The scene phase of :func:`pretrain_backbone`: per-cell classes of reserved scenes; returns its summary.

    A 1×1 convolution on ``layer4`` predicts 14 thing classes + background; its logits are upsampled to stride 8
    and compared with the class map sampled at the cells' centres (cross-entropy, background weighted 0.3, as
    objects cover a small part of a scene). BatchNorm trains too, so its running statistics, which the detector
    freezes, become those of scenes. The held-out score is the accuracy on object cells of scenes of another seed.

    With ``context_weight`` > 0 each step also adds that multiple of :func:`crop_context_loss` on the same scenes
    (``context_boxes`` random boxes per scene, crops resized to ``crop_size``², the scenes' feature maps shared), so
    the features both name what is where and let a resized crop find its place: the two properties the
    detector and UP-DETR's query patches need, in one pass over the scenes.
    """
    from .data.embedded import render_reserved_class_maps

    background = len(CLASSES)
    num_scenes = min(num_scenes, steps * batch)  # never more than the steps use
    images, maps = render_reserved_class_maps(num_scenes, scene_size, seed, object_size, max_objects)
    held_images, held_maps = render_reserved_class_maps(128, scene_size, seed + 1_000_000, object_size, max_objects)
    images = torch.from_numpy(images).permute(0, 3, 1, 2)
    held_images = torch.from_numpy(held_images).permute(0, 3, 1, 2)
    centre = slice(4, None, 8)  # stride-8 cell centres
    targets, held_targets = torch.from_numpy(maps[:, centre, centre]), torch.from_numpy(held_maps[:, centre, centre])
    trunk = torch.nn.Sequential(*list(model.children())[:-2])
    head = torch.nn.Conv2d(model.fc.in_features, background + 1, 1).to(dev)
    weight = torch.ones(background + 1, device=dev)
    weight[background] = 0.3
    opt = torch.optim.AdamW(list(trunk.parameters()) + list(head.parameters()), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)

    def logits_of(fmap: torch.Tensor) -> torch.Tensor:
        return F.interpolate(head(fmap), size=(scene_size // 8, scene_size // 8), mode="bilinear", align_corners=False)

    def scenes_of(x: torch.Tensor) -> torch.Tensor:
        return _normalise(x.to(dev)).contiguous(memory_format=torch.channels_last)

    bar = tqdm(total=steps, desc="CNN scene phase", disable=not progress, dynamic_ncols=True)
    trunk.train()
    order, cursor = torch.randperm(num_scenes, generator=gen), 0
    for _ in range(steps):
        if cursor + batch > num_scenes:
            order, cursor = torch.randperm(num_scenes, generator=gen), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        x = scenes_of(images[idx])
        fmap = trunk(x)
        loss = F.cross_entropy(logits_of(fmap), targets[idx].to(dev), weight=weight)
        if context_weight > 0:
            context, _ = crop_context_loss(trunk, x, context_boxes, crop_size, gen, fmap=fmap)
            loss = loss + context_weight * context
        _train_step(loss, opt, sched, bar)
    bar.close()
    trunk.eval()
    predicted, matches = [], []
    match_gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i in range(0, len(held_images), batch):  # one CNN pass per chunk serves both scores
            x = scenes_of(held_images[i:i + batch])
            fmap = trunk(x)
            predicted.append(logits_of(fmap).argmax(1).cpu())
            if context_weight > 0:
                matches.append(crop_context_loss(trunk, x, context_boxes, crop_size, match_gen, fmap=fmap)[1])
    predicted = torch.cat(predicted)
    on_objects = held_targets != background
    accuracy = float((predicted == held_targets)[on_objects].float().mean())
    log.info("CNN scene phase: held-out accuracy on object cells %.1f%% (%d steps)", 100 * accuracy, steps)
    summary = {"scene_steps": steps, "scene_images": num_scenes, "scene_size": scene_size,
               "scene_object_accuracy": round(accuracy, 4)}
    if matches:
        summary.update(scene_context_weight=context_weight, scene_context_match=round(sum(matches) / len(matches), 4))
        log.info("CNN scene phase: held-out crop-to-box match %.1f%%", 100 * summary["scene_context_match"])
    return summary


def _context_phase(model: torch.nn.Module, steps: int, num_scenes: int, scene_size: int, batch: int, boxes: int,
                   crop_size: int, lr: float, seed: int, dev: torch.device, progress: bool) -> dict:
    """The crop-context phase of :func:`pretrain_backbone`; returns its summary fields."""
    from .data.embedded import render_reserved_scenes

    scenes = torch.from_numpy(render_reserved_scenes(num_scenes, scene_size, seed)).permute(0, 3, 1, 2)
    held_out = torch.from_numpy(render_reserved_scenes(64, scene_size, seed + 1_000_000)).permute(0, 3, 1, 2)
    trunk = torch.nn.Sequential(*list(model.children())[:-2])  # without avgpool and fc
    opt = torch.optim.AdamW(trunk.parameters(), lr=lr, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)

    def held_out_match() -> float:
        trunk.eval()
        eval_gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            hits = [crop_context_loss(trunk, _normalise(held_out[i:i + batch].to(dev)).contiguous(
                memory_format=torch.channels_last), boxes, crop_size, eval_gen)[1] for i in range(0, len(held_out), batch)]
        trunk.train()
        return sum(hits) / len(hits)

    before = held_out_match()
    bar = tqdm(total=steps, desc="CNN crop-context phase", disable=not progress, dynamic_ncols=True)
    trunk.train()
    for _ in range(steps):
        idx = torch.randint(len(scenes), (batch,), generator=gen)
        x = _normalise(scenes[idx].to(dev)).contiguous(memory_format=torch.channels_last)
        loss, match = crop_context_loss(trunk, x, boxes, crop_size, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", match=f"{match:.2f}")
        bar.update()
    bar.close()
    after = held_out_match()
    log.info("CNN crop-context phase: held-out crop-to-box match %.1f%% -> %.1f%% (%d boxes per batch)",
             100 * before, 100 * after, batch * boxes)
    return {"context_steps": steps, "context_match_before": round(before, 4), "context_match": round(after, 4)}
