"""The research probes under studies/ that docs/findings.md quotes numbers from."""

import json
from pathlib import Path

import pytest

from updetr.presets import make_config
from updetr.data.build import build_detection_dataset
from updetr.engine.pretrain import PretrainTask

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def test_single_square_writes_a_coco_dataset_the_loader_reads(tmp_path, load_script):
    module = load_script("studies/single_square.py")
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
    assert target["boxes_cxcywh"].shape == (1, 4) and list(dataset.classes) == ["square"]


@pytest.mark.slow
def test_patch_probe_reports_rates_and_its_reference_points(embedded, tiny_overrides, load_script):
    module = load_script("studies/patch_probe.py")
    cfg = make_config("pretrain-small", overrides=tiny_overrides + [f'data.images="{embedded / "unlabeled"}"'])
    result = module.probe(PretrainTask(cfg), num_images=4)
    assert result["patches"] == 4 * cfg.pretrain.num_patches
    for name in ("crop", "random cell", "pooled in place"):
        assert 0.0 <= result[name] <= 1.0
    # pooling the image's own features over the box points back into the box far more often than chance
    assert result["pooled in place"] >= 0.75


@pytest.mark.slow
def test_patch_probe_defaults_to_the_packaged_imagenet_efficientnet(embedded, monkeypatch, capsys, load_script):
    module = load_script("studies/patch_probe.py")
    monkeypatch.setattr("sys.argv", ["patch_probe.py", "--images", str(embedded / "unlabeled"), "--images-used", "2",
                                     "--set", "data.val_size=64", "--set", "data.max_size=96"])
    module.main()
    out = capsys.readouterr().out
    assert "query patches (efficientnet_lite0, stage 4, " in out
    assert "  crop " in out and "  pooled in place " in out


def test_parallel_sweep_parses_jobs_and_reports_the_logs(tmp_path, capsys, load_script):
    import pytest

    module = load_script("studies/parallel_sweep.py")
    assert module.parse_job("upG:30:cuda:data.batch_size=32;data.num_workers=3") == (
        "upG", 30, "cuda", ["data.batch_size=32", "data.num_workers=3"])
    assert module.parse_job("detr:0:cpu") == ("detr", 0, "cpu", [])
    with pytest.raises(SystemExit, match="NAME:PRE_EPOCHS:PRE_DEVICE"):
        module.parse_job("detr:0")
    assert not hasattr(module, "place_cnn")  # the CNN is the budget's ImageNet backbone, nothing to place

    # report: fine-tuning AP / AP50 at each evaluation (1-based epochs) and the pre-training's last hit rate
    job = tmp_path / "s1" / "up5"
    (job / "pre").mkdir(parents=True)
    (job / "ft").mkdir()
    (job / "pre" / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 4, "train/loss": 14.4, "train/loss_giou": 0.765, "val/hit_rate": 24.06}) + "\n")
    (job / "ft" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"epoch": 6, "val/AP": 0.21, "val/AP50": 1.01}, {"epoch": 7}, {"epoch": 20, "val/AP": 0.92, "val/AP50": 3.1})))
    module.report(tmp_path)
    line = capsys.readouterr().out.strip()
    assert line.startswith("s1 up5")
    assert "5 ep, loss 14.400, GIoU loss 0.765, hit rate 24.1 %" in line
    assert "7:0.21/1.01 21:0.92/3.10 (trained 21 ep)" in line


def test_parallel_sweep_budget_reaches_the_benchmark_and_every_job_config(tmp_path, monkeypatch, capsys, load_script):
    import json as _json

    import pytest
    import torch

    import updetr.stages
    from updetr.demo import prepare_data

    module = load_script("studies/parallel_sweep.py")
    budget = module.budget_for(2, ["num_train=200", "finetune_epochs=84"])
    assert (budget.num_train, budget.finetune_epochs, budget.seed) == (200, 84, 2)
    # the prep and job processes read the sweep's --budget items from the environment
    items = ["num_train=3", "num_val=2", "num_unlabeled=2", "image_size=[64,96]", "finetune_epochs=4"]
    monkeypatch.setenv("UPDETR_SWEEP_BUDGET", _json.dumps(items))
    assert module._budget_overrides() == items

    # prep: the seed's benchmark, written where the demo's stage cache (prepare_data) finds it
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["parallel_sweep.py", "prep", str(out), "1"])
    module.main()
    (stage,) = (out / "s1" / "stages").iterdir()
    meta = _json.loads((stage / "meta.json").read_text())["arguments"]
    assert (meta["seed"], meta["num_train"], meta["num_val"], meta["image_size"]) == (1, 3, 2, [64, 96])
    assert prepare_data(out / "s1", module.budget_for(1, items), progress=False) == stage

    # a job: pre-training, then fine-tuning from its checkpoint, on that benchmark with the budget's frozen
    # ImageNet CNN (the fits themselves are recorded, not run)
    fits = []
    monkeypatch.setattr(updetr.stages, "run_fit", lambda task_cls, cfg, progress: fits.append((task_cls.__name__, cfg)))
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # run_job sets the thread count from it
    module.run_job(out, 1, "up2", 2, "cpu", ["pretrain.num_patches=2"])
    (pre_name, pre), (ft_name, ft) = fits
    assert (pre_name, ft_name) == ("PretrainTask", "DetectionTask")
    for cfg in (pre, ft):
        assert (cfg.model.backbone, cfg.model.backbone_weights, cfg.seed) == ("efficientnet_lite0", "imagenet", 1)
        assert cfg.data.root == str(stage)
    assert pre.optim.epochs == 2 and pre.pretrain.num_patches == 2 and pre.output_dir == str(out / "s1" / "up2" / "pre")
    assert ft.optim.epochs == 4 and ft.init_from == str(out / "s1" / "up2" / "pre" / "checkpoint.pth")
    assert ft.output_dir == str(out / "s1" / "up2" / "ft")

    # a wrong --budget stops the sweep before anything is written; --cnn is gone
    run = ["parallel_sweep.py", "run", str(tmp_path / "bad"), "--job", "detr:0:cpu"]
    monkeypatch.setattr("sys.argv", run + ["--budget", "no_such_field=1"])
    with pytest.raises(SystemExit, match="no_such_field"):
        module.main()
    monkeypatch.setattr("sys.argv", run + ["--cnn", "1=CNN.pth"])
    with pytest.raises(SystemExit) as refused:
        module.main()
    assert refused.value.code == 2 and "unrecognized arguments: --cnn" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written, nothing started


@pytest.mark.slow
def test_patch_swap_moves_patches_between_groups_or_images_and_names_a_missing_run(tmp_path, capsys, load_script):
    import subprocess
    import sys

    import pytest
    import torch

    module = load_script("studies/patch_swap.py")
    patches = torch.arange(2 * 3, dtype=torch.float32).view(2, 3, 1, 1, 1).expand(2, 3, 3, 2, 2)  # (B, M, 3, q, q)
    assert torch.equal(module.swap(patches, "own"), patches)
    groups = module.swap(patches, "other groups")[:, :, 0, 0, 0]
    assert groups.tolist() == [[1, 2, 0], [4, 5, 3]]  # group g sees group g+1's patch of the same image
    images = module.swap(patches, "other image")[:, :, 0, 0, 0]
    assert images.tolist() == [[3, 4, 5], [0, 1, 2]]  # image i sees image i+1's patches
    with pytest.raises(ValueError):
        module.swap(patches, "no such mode")
    # same size elsewhere: image 0's patch on its left half is cut from image 1's right half, at the patch's size
    from updetr.structures import ImageBatch
    pixels = torch.zeros(2, 3, 32, 64)
    pixels[1, :, :, :32], pixels[1, :, :, 32:] = 1.0, -1.0
    targets = [{"boxes_cxcywh": torch.tensor([[0.25, 0.5, 0.25, 0.5]]), "patch_index": torch.tensor([0])},
               {"boxes_cxcywh": torch.tensor([[0.75, 0.5, 0.25, 0.5]]), "patch_index": torch.tensor([0])}]
    moved = module.same_size_elsewhere(ImageBatch(pixels, torch.zeros(2, 32, 64, dtype=torch.bool)), targets, 8)
    assert moved.shape == (2, 1, 3, 8, 8)
    assert torch.allclose(moved[0], torch.full((1, 3, 8, 8), -1.0))  # from image 1, mirrored to its right half
    assert torch.allclose(moved[1], torch.zeros(1, 3, 8, 8))  # image 1's patch comes from image 0
    result = subprocess.run([sys.executable, str(STUDIES / "patch_swap.py"), str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and f"{tmp_path / 'nope' / 'config.json'} not found" in result.stderr


@pytest.mark.slow
def test_patch_swap_own_patches_reproduce_the_runs_hit_rate(embedded, tiny_overrides, tmp_path, load_script):
    from updetr.engine.distributed import DistInfo
    from updetr.engine.loop import fit

    module = load_script("studies/patch_swap.py")
    cfg = make_config("pretrain-small", overrides=tiny_overrides + [
        f'data.images="{embedded / "unlabeled"}"', f'output_dir="{tmp_path}"', "optim.epochs=1"])
    result = fit(PretrainTask(cfg), cfg, DistInfo(), progress=False)
    rates = module.hit_rates(tmp_path, num_images=64)
    assert set(rates) == set(module.MODES) and all(0.0 <= v <= 100.0 for v in rates.values())
    assert rates["own"] == result.final_metrics["hit_rate"]  # same images, patches and model as the run's evaluation
    # the same evaluation split by patch area: the buckets hold every patch once and add up to the run's hit rate
    rows = load_script("studies/patch_sizes.py").hit_rates_by_size(str(tmp_path / "checkpoint.pth"))
    total, hits = sum(r["patches"] for r in rows), sum(r["hits"] for r in rows)
    assert len(rows) == 5 and total > 0 and all(0 <= r["hits"] <= r["patches"] for r in rows)
    assert abs(100.0 * hits / total - result.final_metrics["hit_rate"]) < 1e-6


@pytest.mark.slow
def test_partial_init_starts_the_named_parts_fresh_and_fine_tuning_accepts_it(embedded, tiny_overrides, tmp_path,
                                                                              monkeypatch, load_script):
    import sys

    import pytest
    import torch

    from updetr.engine.checkpoint import load_checkpoint
    from updetr.engine.detection import DetectionTask
    from updetr.engine.distributed import DistInfo
    from updetr.engine.loop import fit

    module = load_script("studies/partial_init.py")
    pre_cfg = make_config("pretrain-small", overrides=tiny_overrides + [
        f'data.images="{embedded / "unlabeled"}"', f'output_dir="{tmp_path / "pre"}"', "optim.epochs=1", "eval_every=0"])
    fit(PretrainTask(pre_cfg), pre_cfg, DistInfo(), progress=False)
    layout = [f'data.root="{embedded}"', 'data.train_images="train"', 'data.val_images="val"',
              'data.train_annotations="annotations/instances_train.json"',
              'data.val_annotations="annotations/instances_val.json"']
    ft_cfg = make_config("small", overrides=tiny_overrides + layout + [f'output_dir="{tmp_path / "ft"}"'])
    ft_cfg.save(tmp_path / "config.json")
    out = tmp_path / "partial.pth"
    argv = ["partial_init", str(tmp_path / "pre" / "checkpoint.pth"), str(tmp_path), str(out),
            "--fresh", "transformer.encoder.", "input_proj."]
    monkeypatch.setattr(sys, "argv", argv)
    assert module.main() == 0

    pretrained, written = load_checkpoint(tmp_path / "pre" / "checkpoint.pth")["model"], load_checkpoint(out)["model"]
    fresh = module.fresh_state(ft_cfg)
    assert set(written) == set(pretrained)
    for key, value in written.items():
        expected = fresh[key] if key.startswith(("transformer.encoder.", "input_proj.")) else pretrained[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(fresh["transformer.encoder.layers.0.linear1.weight"],
                           pretrained["transformer.encoder.layers.0.linear1.weight"])
    # a checkpoint without those parts (e.g. a CNN's) is refused, not copied with nothing replaced
    with pytest.raises(ValueError, match="no tensor under query_embed."):
        module.partial_checkpoint({"model": {"body.conv1.weight": torch.ones(1)}}, fresh, ["query_embed."])
    # fine-tuning takes it like any pre-training checkpoint: decoder pre-trained, encoder fresh
    ft_cfg.init_from = str(out)
    model = DetectionTask(ft_cfg)
    model.train_dataset()
    state = model.build_model().state_dict()
    assert torch.equal(state["transformer.decoder.layers.0.linear1.weight"], pretrained["transformer.decoder.layers.0.linear1.weight"])
    assert torch.equal(state["transformer.encoder.layers.0.linear1.weight"], fresh["transformer.encoder.layers.0.linear1.weight"])
