"""The speed and robustness scripts under benchmarks/ that the README and docs/ quote numbers from."""

import json
from pathlib import Path

import pytest

from updetr.presets import make_config

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_train_step_counts_the_flops_of_a_pretraining_step(tiny_overrides, monkeypatch, load_script):
    module = load_script("benchmarks/train_step.py")
    tiny = [o for o in tiny_overrides if o.startswith(("model.", "pretrain."))]
    monkeypatch.setitem(module.RECIPES, "tiny-pretrain", ("pretrain-small", tiny + ["pretrain.group_matching=true"], 2, 64))
    monkeypatch.setitem(module.RECIPES, "tiny-detr", ("small", tiny, 2, 64))
    pre, detr = (module.bench_recipe(name, steps=1) for name in ("tiny-pretrain", "tiny-detr"))
    for r in (pre, detr):
        assert r["step_s"] > 0 and r["latency_ms"] > 0 and r["gflop_per_step"] > 0
    # the frozen CNN of pre-training runs without a backward pass, so its step counts fewer FLOPs than DETR's with a
    # trained CNN on the same images, although it also encodes the query patches
    assert pre["cfg"].optim.lr_backbone == 0.0 and detr["cfg"].optim.lr_backbone > 0
    assert pre["gflop_per_step"] < detr["gflop_per_step"]


@pytest.mark.slow
def test_feature_engine_times_both_engines_side_by_side_and_names_a_missing_run(embedded, tiny_overrides, tmp_path):
    import subprocess
    import sys

    from updetr.data.embedded import embedded_data_overrides

    run = tmp_path / "run"
    run.mkdir()
    cfg = make_config("small", overrides=tiny_overrides + embedded_data_overrides(embedded) + ["optim.lr_backbone=0"])
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "rates.txt"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "feature_engine.py"), str(run), "--images", "4",
                           "--out", str(out)], capture_output=True, text=True, check=True)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("4 images and their mirrors, two one-thread processes side by side")
    rates = {line.split()[0]: line.split() for line in lines[1:3]}
    assert set(rates) == {"torch", "onnxruntime"}
    assert all(float(r[2]) > 0 and float(r[5]) > 0 for r in rates.values())  # compute, re-read views/s
    assert lines[3].startswith("onnxruntime / torch: compute") and out.read_text().strip() == done.stdout.strip()
    missing = subprocess.run([sys.executable, str(BENCHMARKS / "feature_engine.py"), str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no config.json" in missing.stderr
