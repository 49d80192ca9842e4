"""Checkpoints for the page's tests: tiny random ones (the HTTP contract), and one briefly trained to find patches."""

import json
import shutil

import pytest
import torch

from updetr.presets import make_config
from updetr.engine.checkpoint import save_checkpoint
from updetr.models import build_detr, build_updetr
from updetr.models.one_shot import build_one_shot

# the embedded recipe's CNN (the packaged ImageNet EfficientNet-Lite0 is not needed: random weights) with a narrow
# transformer
TINY = ["model.hidden_dim=32", "model.num_heads=4", "model.enc_layers=1", "model.dec_layers=2", "model.ffn_dim=64",
        "model.dropout=0.0", "model.backbone_weights=none"]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """``{"pretrain": path, "detector": path}``: random weights, the shapes of the embedded recipe's models."""
    folder = tmp_path_factory.mktemp("serve-tiny")
    torch.manual_seed(0)
    pre = make_config("pretrain-embedded", overrides=TINY)
    save_checkpoint(folder / "pretrain.pth", {"model": build_updetr(pre.model, pre.pretrain).state_dict(),
                                              "config": pre.to_dict(), "task": "pretrain"})
    det = make_config("embedded", overrides=TINY)
    save_checkpoint(folder / "detector.pth", {"model": build_detr(det.model, 3).state_dict(), "config": det.to_dict(),
                                              "task": "detection", "classes": ["cat", "coffee", "rocket"]})
    save_checkpoint(folder / "oneshot.pth", {
        "model": build_one_shot(det.model, train_backbone=False).state_dict(), "config": det.to_dict(), "task": "oneshot",
        "oneshot": {"split": {"seen": ["cat"], "unseen": ["rocket"]}, "options": {}}})
    return {"pretrain": folder / "pretrain.pth", "detector": folder / "detector.pth", "oneshot": folder / "oneshot.pth"}


@pytest.fixture(scope="session")
def fake_demo(tmp_path_factory, tiny_checkpoints):
    """A folder laid out as `updetr demo` leaves it (stages/<stage>-<hash>/checkpoint.pth + DONE)."""
    root = tmp_path_factory.mktemp("serve-demo") / "demo"
    for stage, source, init in (("pretrain-0a1b2c3d4e", "pretrain", ""), ("updetr-5f6a7b8c9d", "detector", "pre.pth"),
                                ("detr-0123456789", "detector", ""), ("oneshot-1111111111", "oneshot", "pre.pth"),
                                ("oneshot-2222222222", "oneshot", "")):  # one-shot from the pre-training, from scratch
        (root / "stages" / stage).mkdir(parents=True)
        shutil.copy(tiny_checkpoints[source], root / "stages" / stage / "checkpoint.pth")
        (root / "stages" / stage / "config.json").write_text(json.dumps({"init_from": init}) + "\n")
        (root / "stages" / stage / "DONE").write_text(json.dumps({}) + "\n")
    return root


# the photograph the page test draws on, the box it draws (x, y, w, h in its 512 px pixels: the astronaut's helmet
# and face) and the brief pre-training that learns to find patches of it
PHOTO, PHOTO_SIDE = "skimage:astronaut", 512
PRETRAIN_EPOCHS, COPIES = 150, 8


@pytest.fixture(scope="session")
def trained_pretrain(tmp_path_factory):
    """UP-DETR pre-trained with the embedded recipe (the packaged ImageNet EfficientNet-Lite0 frozen, D=128, 3+3
    layers, Q=10, M=5) on copies of one photograph at 256 px: 300 steps, ~45 s on one idle core. It learns to find
    random patches of that photograph, which a randomly initialised transformer does not (IoU of the test box
    0.14-0.15 for seeds 0-2; 0.24 after 60 steps; 0.70 after these 300)."""
    from PIL import Image

    from updetr.data.embedded_sources import bundled_picture
    from updetr.engine.distributed import init_distributed
    from updetr.engine.loop import fit
    from updetr.engine.pretrain import PretrainTask

    root = tmp_path_factory.mktemp("serve-pretrain")
    images = root / "images"
    images.mkdir()
    picture = Image.fromarray(bundled_picture(PHOTO)).resize((256, 256), Image.BICUBIC)
    for i in range(COPIES):
        picture.save(images / f"{i:03d}.jpg", quality=95)
    cfg = make_config("pretrain-embedded", overrides=[
        f"data.images={json.dumps(str(images))}", f"optim.epochs={PRETRAIN_EPOCHS}",
        f"optim.lr_drop={PRETRAIN_EPOCHS * 3 // 4}", "eval_every=0", "data.num_workers=0", "data.batch_size=4",
        "data.cache_features=true", f"data.feature_cache_dir={json.dumps(str(root / 'features'))}",
        f"output_dir={json.dumps(str(root / 'run'))}", 'device="cpu"', "seed=0"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: one thread is as fast, and fair to a busy machine
    try:
        fit(PretrainTask(cfg), cfg, init_distributed("cpu"), progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "run" / "checkpoint.pth"
