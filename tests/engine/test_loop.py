"""Training loop properties: exact resume, DDP equivalence, overfitting, checkpoints."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from updetr.presets import make_config
from updetr.data.embedded_sources import EMBEDDED_THING_CLASSES
from updetr.engine.checkpoint import load_checkpoint
from updetr.engine.detection import DetectionTask
from updetr.engine.distributed import DistInfo
from updetr.engine.loop import fit

pytestmark = pytest.mark.slow  # each test runs fit() (three times for the resume) or two DDP processes

TINY = [
    "model.backbone=resnet18", "model.hidden_dim=32", "model.num_heads=4", "model.enc_layers=1",
    "model.dec_layers=2", "model.ffn_dim=64", "model.num_queries=8", "model.dropout=0.0",
    "data.scales=[64,80]", "data.max_size=128", "data.crop_resize=[64]", "data.crop_size=[48,64]",
    "data.val_size=64", "data.batch_size=4", "data.num_workers=0", "optim.epochs=2",
]


def tiny_config(embedded, out, *extra):
    layout = [f'data.root="{embedded}"', 'data.train_images="train"', 'data.val_images="val"',
              'data.train_annotations="annotations/instances_train.json"',
              'data.val_annotations="annotations/instances_val.json"', f'output_dir="{out}"']
    return make_config("small", overrides=TINY + layout + list(extra))


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_exact_resume_matches_uninterrupted_run(embedded, tmp_path):
    full = fit(DetectionTask(tiny_config(embedded, tmp_path / "full")), tiny_config(embedded, tmp_path / "full"),
               DistInfo(), progress=False)
    cfg1 = tiny_config(embedded, tmp_path / "split", "optim.epochs=1")
    fit(DetectionTask(cfg1), cfg1, DistInfo(), progress=False)
    cfg2 = tiny_config(embedded, tmp_path / "split")
    fit(DetectionTask(cfg2), cfg2, DistInfo(), resume=str(tmp_path / "split" / "checkpoint.pth"), progress=False)
    a, b = read_metrics(full.output_dir), read_metrics(tmp_path / "split")
    assert [r["epoch"] for r in b] == [0, 1]
    for key in ("train/loss", "train/loss_ce", "train/loss_bbox", "val/AP"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-6, abs=1e-9), key
    wa = load_checkpoint(full.output_dir / "checkpoint.pth")["model"]
    wb = load_checkpoint(tmp_path / "split" / "checkpoint.pth")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_checkpoint_contents_and_best(embedded, tmp_path):
    cfg = tiny_config(embedded, tmp_path / "run", "optim.epochs=1")
    fit(DetectionTask(cfg), cfg, DistInfo(), progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert {"model", "optimizer", "lr_scheduler", "epoch", "config", "rng", "classes", "category_ids"} <= set(ckpt)
    assert ckpt["classes"] == list(EMBEDDED_THING_CLASSES) and ckpt["classes"][:2] == ["cat", "coffee"]
    assert (tmp_path / "run" / "best.pth").is_file()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["hidden_dim"] == 32 and saved["output_dir"] == str(tmp_path / "run")
    assert not list((tmp_path / "run").glob("*.tmp"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_and_grads(model, images, targets):
    from updetr.losses.criterion import build_criterion

    criterion = build_criterion(make_config("small", overrides=TINY).loss, 14)
    loss = criterion(model(images), targets)["loss"]
    loss.backward()
    module = model.module if hasattr(model, "module") else model
    return float(loss.detach()), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _batch(embedded):
    from updetr.config import DataConfig
    from updetr.data.build import build_detection_dataset
    from updetr.data.collate import collate_detection

    data = DataConfig(root=str(embedded), train_images="train", train_annotations="annotations/instances_train.json",
                      val_images="train", val_annotations="annotations/instances_train.json", val_size=64, max_size=128)
    ds = build_detection_dataset(data, "val")  # deterministic transform
    return collate_detection([ds[i] for i in range(4)])


def _model():
    from updetr.models import build_detr

    torch.manual_seed(0)
    return build_detr(make_config("small", overrides=TINY).model, 14)


def _ddp_worker(rank, port, embedded, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from updetr.engine.distributed import cleanup, init_distributed
    from updetr.structures import ImageBatch

    init_distributed("cpu")
    images, targets = _batch(embedded)
    mine = [rank, rank + 2]  # rank r takes images r and r + 2 of the global batch of 4
    local = ImageBatch(images.pixels[mine], images.padding_mask[mine])
    loss, grads = _loss_and_grads(torch.nn.parallel.DistributedDataParallel(_model()), local, [targets[i] for i in mine])
    torch.save({"loss": torch.tensor(loss), "grads": grads}, f"{out_path}.{rank}")
    cleanup()


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(embedded, tmp_path):
    """DDP's averaged gradient equals the single-process gradient of the global batch.

    This holds exactly (up to float round-off) only because the loss normalisers (number of
    boxes, total class weight) are averaged over processes. Weights are not compared after
    several AdamW steps: Adam divides by the gradient's RMS, which turns round-off in
    near-zero gradients into lr-sized differences.
    """
    out = tmp_path / "ddp"
    mp.start_processes(_ddp_worker, args=(_free_port(), str(embedded), str(out)), nprocs=2, join=True, start_method="spawn")
    images, targets = _batch(embedded)
    single_loss, single_grads = _loss_and_grads(_model(), images, targets)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert float(ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(single_loss, rel=1e-5)
    assert abs(float(ranks[0]["loss"] - ranks[1]["loss"])) > 1e-3  # the ranks really saw different images
    assert set(ranks[0]["grads"]) == set(single_grads)
    for k, g in single_grads.items():
        for r in range(2):  # after the all-reduce every rank holds the same, global gradient
            # per-tensor relative error: round-off differs between batch sizes (the convolution
            # kernels change), while a wrong normaliser would be off by ~10 % or more
            err = float((ranks[r]["grads"][k] - g).norm() / g.norm().clamp_min(1e-12))
            assert err < 1e-4, (k, err)


def test_best_checkpoint_keeps_the_best_epoch_when_later_epochs_are_worse(embedded, tmp_path, monkeypatch):
    scores = iter([5.0, 1.0, 3.0])  # epoch 0 is the best

    def fake_evaluate(self, model, loader, device, progress):
        return {"AP": next(scores)}

    monkeypatch.setattr(DetectionTask, "evaluate", fake_evaluate)
    monkeypatch.setattr(DetectionTask, "primary_metric", "AP")
    cfg = tiny_config(embedded, tmp_path / "run", "optim.epochs=3", "max_steps_per_epoch=1")
    fit(DetectionTask(cfg), cfg, DistInfo(), progress=False)
    best, last = load_checkpoint(tmp_path / "run" / "best.pth"), load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert (best["epoch"], best["best_metric"]) == (0, 5.0)
    assert last["epoch"] == 2
    assert not torch.equal(best["model"]["query_embed.weight"], last["model"]["query_embed.weight"])
    assert not (tmp_path / "run" / "best.pth.tmp").exists()
