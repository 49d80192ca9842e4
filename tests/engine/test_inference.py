"""One loader for every task's checkpoints (``load_trained``), and evaluation of a checkpoint that batches and
scores exactly as evaluation during training does (``evaluate_checkpoint``, the CLI's ``eval`` commands)."""

import json

import pytest
import torch

from updetr import cli
from updetr.config import ConfigError
from updetr.presets import make_config
from updetr.data.embedded import embedded_data_overrides
from updetr.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from updetr.engine.distributed import DistInfo
from updetr.engine.inference import evaluate_checkpoint, load_trained
from updetr.engine.loop import fit
from updetr.engine.tasks import TASKS, build_task
from updetr.models.detr import DETR
from updetr.models.one_shot import OneShotDETR
from updetr.models.segmentation import DETRsegm
from updetr.models.updetr import UPDETR

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

MODEL_OF = {"detection": DETR, "pretrain": UPDETR, "oneshot": OneShotDETR, "panoptic": DETRsegm}


def task_config(name, embedded, out, tiny_overrides):
    run = [f"output_dir={json.dumps(str(out))}", "optim.epochs=1", "data.size_divisibility=32"]
    if name == "pretrain":
        return make_config("pretrain-small", overrides=tiny_overrides + run + [
            f"data.root={json.dumps(str(embedded))}", 'data.images="unlabeled"'])
    extra = {"oneshot": ["oneshot.num_draws=2"], "panoptic": ["panoptic.stage=joint", "panoptic.threshold=0.05"]}
    return make_config("small", overrides=tiny_overrides + embedded_data_overrides(embedded) + run + extra.get(name, []))


def spy_eval_batches(monkeypatch, cls):
    """Record (shape, padding-mask sum, pixel sum) of every batch ``cls`` sees in eval mode."""
    seen = []
    real = cls.forward

    def forward(self, images, *args, **kwargs):
        if not self.training:
            seen.append((tuple(images.pixels.shape), int(images.padding_mask.sum()),
                         round(float(images.pixels.double().sum()), 2)))
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detection", "pretrain", "oneshot", "panoptic"])
def test_a_checkpoint_evaluates_as_training_did(name, embedded, tmp_path, tiny_overrides, monkeypatch):
    cfg = task_config(name, embedded, tmp_path / "run", tiny_overrides)
    seen = spy_eval_batches(monkeypatch, MODEL_OF[name])
    result = fit(build_task(name, cfg), cfg, DistInfo(), progress=False)
    during_training = list(seen)
    assert during_training, "the run evaluated after its epoch"
    seen.clear()
    metrics = evaluate_checkpoint(tmp_path / "run" / "checkpoint.pth", device="cpu")
    assert seen == during_training  # the same images, resized, padded and batched the same way
    assert set(metrics) == set(result.final_metrics)
    for key, value in result.final_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    loaded = load_trained(tmp_path / "run" / "checkpoint.pth")
    assert loaded.task == name and isinstance(loaded.model, MODEL_OF[name]) and not loaded.model.training
    assert loaded.config.model.backbone_weights == "none" and loaded.config.init_from == ""


@pytest.mark.slow
def test_the_oneshot_and_panoptic_commands_agree_with_training(embedded, tmp_path, tiny_overrides, monkeypatch):
    """`updetr oneshot eval` once padded to 1 pixel while training padded to data.size_divisibility."""
    for name, command in (("oneshot", ["oneshot", "eval"]), ("panoptic", ["panoptic", "eval"])):
        cfg = task_config(name, embedded, tmp_path / name, tiny_overrides)
        seen = spy_eval_batches(monkeypatch, MODEL_OF[name])
        result = fit(build_task(name, cfg), cfg, DistInfo(), progress=False)
        during_training = list(seen)
        seen.clear()
        out = tmp_path / f"{name}.json"
        assert cli.main([*command, "--checkpoint", str(tmp_path / name / "checkpoint.pth"), "--json", str(out),
                         "--no-progress"]) == 0
        assert seen == during_training, name
        printed = json.loads(out.read_text())
        keys = {"AP50_seen": "seen_AP50", "AP50_unseen": "unseen_AP50"} if name == "oneshot" else {"PQ": "PQ"}
        for train_key, eval_key in keys.items():
            assert printed[eval_key] == pytest.approx(result.final_metrics[train_key], abs=1e-6, nan_ok=True)


def test_every_task_has_one_entry_and_one_shape():
    assert set(TASKS) == {"detection", "pretrain", "oneshot", "panoptic"}
    for name, cls in TASKS.items():
        assert cls.name == name
        for method in ("train_dataset", "val_dataset", "eval_dataset", "collate", "cache_features", "build_architecture",
                       "build_model", "build_criterion", "forward", "evaluate", "checkpoint_extra", "restore"):
            assert callable(getattr(cls, method, None)), f"{cls.__name__}.{method}"


def _tiny_detr_checkpoint(path, tiny_overrides, **extra):
    cfg = make_config("small", overrides=tiny_overrides + ["model.num_classes=3"])
    model = TASKS["detection"](cfg)
    model.classes = ["a", "b", "c"]
    save_checkpoint(path, {"model": model.build_architecture().state_dict(), "config": cfg.to_dict(),
                           "task": "detection", "classes": ["a", "b", "c"], **extra})
    return cfg


def test_a_checkpoint_of_another_task_names_the_command_that_trains_it(tmp_path, tiny_overrides):
    _tiny_detr_checkpoint(tmp_path / "det.pth", tiny_overrides)
    with pytest.raises(CheckpointError, match=r"is a 'detection' checkpoint, not one from `updetr oneshot train` "
                                              r"\(to start from its weights: updetr oneshot train --init-from"):
        load_trained(tmp_path / "det.pth", tasks=("oneshot",))
    ckpt = load_checkpoint(tmp_path / "det.pth")
    save_checkpoint(tmp_path / "odd.pth", {**ckpt, "task": "segmentation"})
    with pytest.raises(CheckpointError, match="task 'segmentation' is not one of detection, pretrain, oneshot, panoptic"):
        load_trained(tmp_path / "odd.pth")
    save_checkpoint(tmp_path / "bare.pth", {"model": ckpt["model"]})
    with pytest.raises(CheckpointError, match="has no 'config' entry.*updetr convert"):
        load_trained(tmp_path / "bare.pth")


def test_overrides_reach_the_config_but_not_the_weights(tmp_path, tiny_overrides):
    _tiny_detr_checkpoint(tmp_path / "det.pth", tiny_overrides)
    loaded = load_trained(tmp_path / "det.pth", overrides=["data.val_size=80"])
    assert loaded.config.data.val_size == 80 and loaded.classes == ["a", "b", "c"]
    with pytest.raises(ConfigError, match=r"model.hidden_dim=64: the architecture \(model.\*, pretrain.\*, panoptic.stage\) "
                                          r"is the checkpoint's"):
        load_trained(tmp_path / "det.pth", overrides=["model.hidden_dim=64"])
    with pytest.raises(ConfigError, match=r"panoptic.stage=2: the architecture"):  # DETR or DETRsegm
        load_trained(tmp_path / "det.pth", overrides=["panoptic.stage=2"])


def test_checkpoints_that_kept_their_settings_beside_the_config_still_load(tmp_path, tiny_overrides):
    """Panoptic and one-shot settings were once stored next to the config instead of in it."""
    cfg = make_config("small", overrides=tiny_overrides + ["model.num_classes=2"])
    stored = cfg.to_dict()
    stored.pop("panoptic")
    categories = [{"id": 1, "name": "cat", "isthing": 1, "color": [1, 2, 3]},
                  {"id": 7, "name": "grass", "isthing": 0, "color": [4, 5, 6]}]
    legacy = {"stage": "2", "threshold": 0.5, "min_area": 9, "loss_mask": 1.0, "loss_dice": 1.0, "train_annotations": "",
              "train_segmentations": "", "val_annotations": "", "val_segmentations": ""}
    task = TASKS["panoptic"](make_config("small", overrides=tiny_overrides + ["model.num_classes=2", "panoptic.stage=2"]))
    task.classes = ["cat", "grass"]
    save_checkpoint(tmp_path / "pan.pth", {"model": task.build_architecture().state_dict(), "config": stored,
                                           "task": "panoptic", "classes": ["cat", "grass"], "category_ids": [1, 7],
                                           "categories": categories, "panoptic": legacy})
    loaded = load_trained(tmp_path / "pan.pth")
    assert loaded.config.panoptic.stage == "2" and loaded.config.panoptic.min_area == 9
    assert loaded.category_ids == [1, 7] and loaded.isthing == [True, False]
    save_checkpoint(tmp_path / "bad.pth", {**load_checkpoint(tmp_path / "pan.pth"), "panoptic": {**legacy, "zoom": 2}})
    with pytest.raises(CheckpointError, match=r"unknown panoptic options \['zoom'\]"):
        load_trained(tmp_path / "bad.pth")

    one = TASKS["oneshot"](cfg)
    save_checkpoint(tmp_path / "os.pth", {
        "model": one.build_architecture().state_dict(), "config": cfg.to_dict(), "task": "oneshot",
        "classes": ["a", "b"], "oneshot": {"split": {"seen": ["a"], "unseen": ["b"]}, "init": "scratch",
                                           "options": {"num_draws": 3, "ap_method": "voc", "split": ""}}})
    loaded = load_trained(tmp_path / "os.pth")
    assert loaded.config.oneshot.num_draws == 3 and loaded.config.oneshot.ap_method == "voc"
    assert loaded.split.seen == ("a",) and loaded.split.unseen == ("b",) and loaded.init == "scratch"
    torch.testing.assert_close(loaded.model.state_dict()["query_embed.weight"],
                               load_checkpoint(tmp_path / "os.pth")["model"]["query_embed.weight"])
