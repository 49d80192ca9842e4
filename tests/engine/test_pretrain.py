"""UP-DETR pre-training: frozen CNN, loss decreases, fine-tuning initialisation keeps/drops the right keys."""

import copy

import pytest
import torch

from updetr.presets import make_config
from updetr.engine.checkpoint import CheckpointError, init_from_checkpoint, save_checkpoint
from updetr.engine.distributed import DistInfo
from updetr.engine.epoch import build_optimizer
from updetr.engine.loop import fit
from updetr.engine.pretrain import PretrainTask
from updetr.models import build_detr, build_updetr


def pretrain_config(embedded, out, tiny_overrides, *extra):
    return make_config("pretrain-small", overrides=tiny_overrides + [
        f'data.root="{embedded}"', 'data.images="unlabeled"', f'output_dir="{out}"', *extra])


@pytest.mark.slow
def test_frozen_cnn_unchanged_after_a_step_and_no_backward_through_it(embedded, tmp_path, tiny_overrides):
    cfg = pretrain_config(embedded, tmp_path, tiny_overrides)
    task = PretrainTask(cfg)
    model, criterion = task.build_model(), task.build_criterion()
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))
    optimizer, _ = build_optimizer(model, cfg)
    assert len(optimizer.param_groups) == 1  # no backbone group: nothing of the CNN is optimised
    before = copy.deepcopy(model.backbone.state_dict())
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    output, targets = task.forward(model, batch, torch.device("cpu"))
    assert not output.patch_features.requires_grad  # computed without autograd
    loss = criterion(output, targets)["loss"]
    loss.backward()
    optimizer.step()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.query_embed.weight.grad is not None


def test_eos_coef_defaults_to_m_over_q(embedded, tmp_path, tiny_overrides):
    task = PretrainTask(pretrain_config(embedded, tmp_path, tiny_overrides))
    assert task.eos_coef == pytest.approx(2 / 8)
    assert task.build_criterion().empty_weight[-1] == pytest.approx(0.25)
    fixed = PretrainTask(pretrain_config(embedded, tmp_path, tiny_overrides, "loss.eos_coef=0.1"))
    assert fixed.eos_coef == pytest.approx(0.1)


@pytest.mark.slow
def test_short_pretraining_lowers_the_pretext_loss(embedded, tmp_path, tiny_overrides):
    """A few steps on a fixed batch of generated images lower every pretext loss term."""
    cfg = pretrain_config(embedded, tmp_path, tiny_overrides, "pretrain.patch_drop_ratio=0.0")
    task = PretrainTask(cfg)
    torch.manual_seed(0)
    model, criterion = task.build_model(), task.build_criterion()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    val = task.val_dataset()  # fixed crops, no augmentation
    batch = task.collate([val[i] for i in range(4)])
    losses = []
    for _ in range(25):
        output, targets = task.forward(model, batch, torch.device("cpu"))
        terms = criterion(output, targets)
        losses.append({k: float(v.detach()) for k, v in terms.items() if k in ("loss", "loss_ce", "loss_giou", "loss_feature")})
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    first, last = losses[0], losses[-1]
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    for key in ("loss_ce", "loss_giou", "loss_feature"):
        assert last[key] < first[key], key


@pytest.mark.slow
def test_pretrain_fit_logs_hit_rate(embedded, tmp_path, tiny_overrides):
    cfg = pretrain_config(embedded, tmp_path / "run", tiny_overrides, "optim.epochs=1")
    result = fit(PretrainTask(cfg), cfg, DistInfo(), progress=False)
    assert 0.0 <= result.final_metrics["hit_rate"] <= 100.0 and "train/loss_feature" in result.history[-1]


def _save(model, path, **extra):
    save_checkpoint(path, {"model": model.state_dict(), **extra})


@pytest.mark.slow
def test_init_from_keeps_and_drops_exactly_the_right_keys(tmp_path, tiny_overrides):
    cfg = make_config("pretrain-small", overrides=tiny_overrides)
    pre = build_updetr(cfg.model, cfg.pretrain)
    _save(pre, tmp_path / "pre.pth")
    detr = build_detr(cfg.model, num_classes=14)
    report = init_from_checkpoint(detr, tmp_path / "pre.pth")
    assert set(report["dropped"]) == {k for k in pre.state_dict() if k.startswith(("class_embed.", "patch2query.", "feature_align."))}
    assert set(report["kept_fresh"]) == {"class_embed.weight", "class_embed.bias"}
    loaded = set(report["loaded"])
    assert loaded == {k for k in detr.state_dict() if not k.startswith("class_embed.")}
    for k in loaded:
        assert torch.equal(detr.state_dict()[k], pre.state_dict()[k]), k
    assert any(k.startswith("transformer.") for k in loaded) and "query_embed.weight" in loaded
    assert "bbox_embed.layers.0.weight" in loaded and "input_proj.weight" in loaded


@pytest.mark.slow
def test_init_from_fails_loudly_on_architecture_mismatch(tmp_path, tiny_overrides):
    cfg = make_config("pretrain-small", overrides=tiny_overrides)
    _save(build_updetr(cfg.model, cfg.pretrain), tmp_path / "pre.pth")
    post_norm = make_config("small", overrides=tiny_overrides + ["model.pre_norm=false"]).model
    with pytest.raises(CheckpointError, match="encoder.norm") as err:
        init_from_checkpoint(build_detr(post_norm, 14), tmp_path / "pre.pth")
    assert "pre_norm" in str(err.value)
    wider = make_config("small", overrides=tiny_overrides + ["model.hidden_dim=64"]).model
    with pytest.raises(CheckpointError, match="wrong shape"):
        init_from_checkpoint(build_detr(wider, 14), tmp_path / "pre.pth")
    # a detection checkpoint with another number of classes: the class head is re-initialised
    _save(build_detr(cfg.model, 3), tmp_path / "det3.pth")
    report = init_from_checkpoint(build_detr(cfg.model, 14), tmp_path / "det3.pth")
    assert report["kept_fresh"] == ["class_embed.bias", "class_embed.weight"]


@pytest.mark.slow
def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny_overrides):
    cfg = make_config("small", overrides=tiny_overrides)
    _save(build_detr(cfg.model, 3), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="half.pth"):
        init_from_checkpoint(build_detr(cfg.model, 3), tmp_path / "half.pth")


def test_num_patches_must_divide_queries(embedded, tmp_path, tiny_overrides):
    from updetr.config import ConfigError

    with pytest.raises(ConfigError, match="pretrain.num_patches=3 must divide model.num_queries=8"):
        PretrainTask(pretrain_config(embedded, tmp_path, tiny_overrides, "pretrain.num_patches=3"))
