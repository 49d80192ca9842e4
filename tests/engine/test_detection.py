"""DETR can memorise a handful of images: the model, loss, matcher and evaluation fit together."""

import json

import pytest

from updetr.presets import make_config
from updetr.engine.detection import DetectionTask
from updetr.engine.distributed import DistInfo
from updetr.engine.loop import fit

pytestmark = pytest.mark.slow  # 120 epochs of DETR


def test_overfitting_two_images_reaches_high_ap(embedded, tmp_path):
    coco = json.loads((embedded / "annotations" / "instances_train.json").read_text())
    keep = {img["id"] for img in coco["images"][:2]}
    coco["images"] = [img for img in coco["images"] if img["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    subset = tmp_path / "two.json"
    subset.write_text(json.dumps(coco))
    overrides = [
        "model.backbone=resnet18", "model.hidden_dim=64", "model.num_heads=4", "model.enc_layers=1",
        "model.dec_layers=2", "model.ffn_dim=128", "model.num_queries=10", "model.dropout=0.0",
        f'data.root="{embedded}"', 'data.train_images="train"', 'data.val_images="train"',
        f'data.train_annotations="{subset}"', f'data.val_annotations="{subset}"',
        "data.scales=[64]", "data.max_size=128", "data.crop=false", "data.hflip=0", "data.val_size=64",
        "data.batch_size=2", "data.num_workers=0", "optim.lr=1e-3", "optim.lr_backbone=0",
        "optim.epochs=120", "optim.lr_drop=1000", "eval_every=0", f'output_dir="{tmp_path / "run"}"',
    ]
    cfg = make_config("small", overrides=overrides)
    result = fit(DetectionTask(cfg), cfg, DistInfo(), progress=False)
    assert result.history[-1]["train/loss"] < 0.3 * result.history[0]["train/loss"]
    assert result.final_metrics["AP50"] > 80.0, result.final_metrics
