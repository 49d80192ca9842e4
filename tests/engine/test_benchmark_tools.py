"""The diagnostic scripts under benchmarks/ that the README quotes numbers from."""

import importlib.util
import json
from pathlib import Path

from updetr.config import make_config
from updetr.data.build import build_detection_dataset
from updetr.engine.pretrain import PretrainTask

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_single_square_writes_a_coco_dataset_the_loader_reads(tmp_path):
    module = _load("single_square")
    for split, count, seed in (("train", 6, 1), ("val", 3, 2)):
        module.write_split(tmp_path, split, count, size=64, seed=seed)
    data = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert len(data["images"]) == 6 and len(data["annotations"]) == 6
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert w == h and 10 <= w < 30 and x + w <= 64 and y + h <= 64
    cfg = make_config("small", overrides=[f'data.root="{tmp_path}"', 'data.train_images="train"',
                                          'data.train_annotations="annotations/instances_train.json"'])
    dataset = build_detection_dataset(cfg.data, "train")
    image, target = dataset[0]
    assert target["boxes"].shape == (1, 4) and list(dataset.classes) == ["square"]


def test_patch_probe_reports_rates_and_its_reference_points(embedded, tiny_overrides):
    module = _load("patch_probe")
    cfg = make_config("pretrain-small", overrides=tiny_overrides + [f'data.images="{embedded / "unlabeled"}"'])
    result = module.probe(PretrainTask(cfg), num_images=4)
    assert result["patches"] == 4 * cfg.pretrain.num_patches
    for name in ("crop", "random cell", "pooled in place"):
        assert 0.0 <= result[name] <= 1.0
    # pooling the image's own features over the box points back into the box far more often than chance
    assert result["pooled in place"] >= 0.75
