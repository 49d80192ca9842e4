"""Does a pre-trained UP-DETR find *its* query patch, or just where patches tend to be? Swap the patches and see.

    python studies/patch_swap.py PRETRAIN_RUN [--images 64]

PRETRAIN_RUN is a pre-training run folder (``config.json`` + ``checkpoint.pth``, e.g. a demo stage
``stages/pretrain-*``). The pretext hit rate (IoU >= 0.5 between the box of each patch's group's most confident
query and that patch's box) is measured on the run's own evaluation images and patches, with the targets fixed and
the patches fed to the model:

- ``own``: as drawn (the run's ``val/hit_rate``, here on pixels rather than cached features);
- ``other groups``: the image's own patches, rotated by one group, so group g is shown the patch of group g+1;
- ``other image``: the patches of the next image of the batch;
- ``no patch``: all-zero patch features (``patch2query`` bias only);
- ``same size elsewhere``: for each patch, the crop of the same size at the point-mirrored place of the next image
  of the batch (cut from its resized pixels), resized to the query size: wrong content, right scale.

If the three controls score about as high as ``own``, the decoder's hits come from a prior over where patches
lie, not from the patch; the gap between ``own`` and them is what the pretext has learned about the patches. A
``same size elsewhere`` rate close to ``own`` says the patch tells the decoder mostly how large its box is (a
small crop is enlarged to the query size and looks blurred, a large one is shrunk and looks sharp), not where.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch.utils.data import DataLoader, Subset

from updetr.config import Config, ConfigError
from updetr.data.io import DataError
from updetr.engine import pretrain
from updetr.engine.checkpoint import CheckpointError, load_checkpoint
from updetr.models.backbone import BackboneWeightsError
from updetr.structures import ImageBatch

MODES = ("own", "other groups", "other image", "no patch", "same size elsewhere")


def swap(patches: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, M, 3, q, q) patches as shown to the model in ``mode`` (targets stay those of the drawn patches)."""
    if mode == "own":
        return patches
    if mode == "other groups":
        return patches.roll(-1, dims=1)
    if mode == "other image":
        return patches.roll(-1, dims=0)
    raise ValueError(mode)


def same_size_elsewhere(images: ImageBatch, targets: list[dict], query_size: int) -> torch.Tensor:
    """(B, M, 3, q, q) patches: for patch n of image i, the crop of image i+1 (normalised pixels) of the same size
    as patch n's box, centred at the point-mirrored place (1 - cx, 1 - cy), resized to ``query_size``."""
    pixels, sizes = images.pixels, images.image_sizes  # (B, 3, H, W), (B, 2)
    num_patches = max(len(t["patch_index"]) for t in targets)
    out = pixels.new_zeros(pixels.shape[0], num_patches, 3, query_size, query_size)
    for i, target in enumerate(targets):
        j = (i + 1) % pixels.shape[0]
        height, width = sizes[j].tolist()
        for box, group in zip(target["boxes_cxcywh"].tolist(), target["patch_index"].tolist()):
            cx, cy, w, h = 1.0 - box[0], 1.0 - box[1], box[2], box[3]
            x0, x1 = int(max(0.0, cx - w / 2) * width), int(min(1.0, cx + w / 2) * width)
            y0, y1 = int(max(0.0, cy - h / 2) * height), int(min(1.0, cy + h / 2) * height)
            crop = pixels[j:j + 1, :, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
            out[i, group] = nnf.interpolate(crop, size=(query_size, query_size), mode="bilinear", antialias=True)[0]
    return out


@torch.no_grad()
def hit_rates(run: Path, num_images: int, device: str = "cpu") -> dict[str, float]:
    cfg = Config.load(run / "config.json").override(["data.cache_features=false", "data.num_workers=0"])
    task = pretrain.PretrainTask(cfg)
    model = task.build_model()
    model.load_state_dict(load_checkpoint(run / "checkpoint.pth")["model"], strict=True)
    model.to(device).eval()
    val = task.val_dataset()
    val = Subset(val.dataset, val.indices[:num_images])
    loader = DataLoader(val, batch_size=cfg.data.batch_size, collate_fn=task.collate)
    results = {}
    for mode in MODES:
        if mode == "no patch":  # the pooled CNN feature of every patch replaced by zeros
            body = model.backbone.body
            original = body.pooled_features
            body.pooled_features = lambda p: torch.zeros(p.shape[0], original(p[:1]).shape[1], device=p.device)
            try:
                results[mode] = pretrain.evaluate_pretext(model, loader, torch.device(device))["hit_rate"]
            finally:
                body.pooled_features = original
            continue
        if mode == "same size elsewhere":
            swapped = [(images, targets, same_size_elsewhere(images, targets, cfg.pretrain.query_size))
                       for images, targets, patches in loader]
        else:
            swapped = [(images, targets, swap(patches, mode)) for images, targets, patches in loader]
        results[mode] = pretrain.evaluate_pretext(model, swapped, torch.device(device))["hit_rate"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=pretrain.EVAL_IMAGES)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for name in ("config.json", "checkpoint.pth"):
        if not (args.run / name).is_file():
            raise SystemExit(f"patch_swap: {args.run / name} not found (expected a pre-training run folder)")
    try:
        rates = hit_rates(args.run, args.images, args.device)
    except (ConfigError, DataError, BackboneWeightsError, CheckpointError) as error:
        raise SystemExit(f"patch_swap: {error}") from None
    print(json.dumps({"run": str(args.run), "images": args.images, "hit_rate": rates}, indent=2))


if __name__ == "__main__":
    main()
