"""Does the pretext fail for want of good query-patch features? Pre-train with 'oracle' ones and compare losses.

    python studies/oracle_patches.py PRETRAIN_RUN OUT

PRETRAIN_RUN is a pre-training run folder (for example a demo stage ``stages/pretrain-*``) whose ``config.json`` has
``data.cache_features=true``. The same run is repeated into OUT with each query patch's feature taken from the
image's own cached feature map, average-pooled over the patch's box (``roi_align``), instead of the CNN applied to
the crop resized to the query size: features that match the image by construction. If the pretext losses of OUT's
``metrics.jsonl`` are no lower than the original run's, the decoder has not yet learned to use the patch features
at all, and better patch features alone cannot help at that length. The pretext hit rate is not measured (the
evaluation would need the same substitution).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchvision.ops import roi_align

from updetr.box_ops import cxcywh_to_xyxy
from updetr.config import Config, ConfigError
from updetr.data.io import DataError
from updetr.engine import pretrain
from updetr.engine.detection import targets_to_device
from updetr.engine.distributed import init_distributed
from updetr.engine.loop import fit
from updetr.models.backbone import BackboneWeightsError


def in_place_forward(self, model, batch, device):
    """``PretrainTask.forward`` with the patch features pooled from the image's cached feature map."""
    images, targets, patches = batch
    images = images.to(device)
    fmap, mask = images.features, images.padding_mask
    valid_h, valid_w = (~mask).any(2).sum(1).float(), (~mask).any(1).sum(1).float()  # image extent in cells
    rois = []
    for i, target in enumerate(targets):  # normalised to the image -> feature cells
        scale = torch.stack([valid_w[i], valid_h[i], valid_w[i], valid_h[i]])
        boxes = cxcywh_to_xyxy(target["boxes_cxcywh"].to(device)) * scale
        rois.append(torch.cat([torch.full((len(boxes), 1), float(i), device=device), boxes], 1))
    features = roi_align(fmap, torch.cat(rois), output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    pooled = features.mean((2, 3))  # (B*M, C), in the order the model flattens its patches
    model.backbone.body.pooled_features = lambda _patches: pooled
    return model(images, patches.to(device)), targets_to_device(targets, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    try:
        cfg = Config.load(args.run / "config.json").override([f"output_dir={json.dumps(str(args.out))}"])
        if not cfg.data.cache_features:
            parser.error(f"{args.run}/config.json: data.cache_features must be true (the features are read from the cache)")
        pretrain.PretrainTask.forward = in_place_forward
        pretrain.PretrainTask.evaluate = lambda self, model, loader, device, progress=True: {}
        fit(pretrain.PretrainTask(cfg), cfg, init_distributed(cfg.device), progress=True)
    except (ConfigError, DataError, BackboneWeightsError) as error:
        raise SystemExit(f"oracle_patches: {error}") from None
    for name in (args.run, args.out):
        print(name)
        for line in (name / "metrics.jsonl").read_text().splitlines():
            h = json.loads(line)
            print(f"  epoch {h['epoch']}: GIoU {h['train/loss_giou']:.3f}  L1 {h['train/loss_bbox']:.3f}  "
                  f"CE {h['train/loss_ce']:.3f}  feature {h['train/loss_feature']:.3f}")


if __name__ == "__main__":
    main()
