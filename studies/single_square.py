"""A control dataset for DETR's slow start: one white square on black, one class, COCO layout.

    python studies/single_square.py OUT [--num-train 400 --num-val 100 --size 128]
    updetr train --preset embedded --data-root OUT --set data.train_images='"train"' \\
        --set data.val_images='"val"' --set data.train_annotations='"annotations/instances_train.json"' \\
        --set data.val_annotations='"annotations/instances_val.json"' --set model.backbone=efficientnet_lite0 \\
        --backbone-weights imagenet --epochs 24 --set eval_every=4 --set optim.lr_drop=1000 --set model.num_queries=10 --seed 1

Nothing here is hard to see: if a recipe cannot detect these squares, its trouble is the set-prediction
training itself (query specialisation and ranking), not features, clutter or class confusion.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_split(root: Path, split: str, count: int, size: int, seed: int) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(count):
        pixels = np.zeros((size, size, 3), np.uint8)
        side = int(rng.integers(size * 20 // 128, size * 60 // 128))  # 20-59 px at 128
        x = int(rng.integers(0, size - side))
        y = int(rng.integers(0, size - side))
        pixels[y:y + side, x:x + side] = 255
        name = f"{i:06d}.jpg"
        Image.fromarray(pixels).save(root / split / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, side, side],
                            "area": side * side, "iscrowd": 0})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    write_split(args.out, "train", args.num_train, args.size, seed=1)
    write_split(args.out, "val", args.num_val, args.size, seed=2)
    print(f"single-square control dataset in {args.out}")


if __name__ == "__main__":
    main()
