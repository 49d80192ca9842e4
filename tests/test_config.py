"""Config validation: every out-of-range value is one ConfigError naming the field."""

import pytest

from updetr.config import Config, ConfigError
from updetr.presets import make_config
from updetr.engine.distributed import resolve_device


@pytest.mark.parametrize("override, field", [
    ("max_steps_per_epoch=-1", "max_steps_per_epoch=-1 must be >= 0"),
    ("eval_every=-3", "eval_every=-3 must be >= 0"),
    ("optim.lr=NaN", "optim.lr=nan must be a finite number"),
    ("loss.cost_giou=Infinity", "loss.cost_giou=inf must be a finite number"),
    ("optim.lr_drop=0", "optim.lr_drop=0 must be > 0"),
    ("optim.clip_max_norm=-1", "optim.clip_max_norm=-1.0 must be >= 0"),
    ("data.hflip=1.5", "data.hflip=1.5 is a probability"),
    ("loss.loss_bbox=-2", "loss.loss_bbox=-2.0 must be >= 0"),
    ("pretrain.patch_drop_ratio=1", "pretrain.patch_drop_ratio=1.0 must be in [0, 1)"),
    ("pretrain.query_size=0", "pretrain.query_size=0 must be > 0"),
    ("pretrain.max_patch_size=4", "pretrain.max_patch_size=4 must be 0 (no cap) or at least pretrain.min_patch_size=8"),
    ("seed=-5", "seed=-5 must be >= 0"),
    ('device="tpu"', "device='tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    ('output_dir=""', "output_dir is empty"),
])
def test_out_of_range_values_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        make_config("small", overrides=[override])


def test_zero_still_means_every_step_and_evaluate_at_the_end():
    cfg = make_config("small", overrides=["max_steps_per_epoch=0", "eval_every=0"])
    assert cfg.max_steps_per_epoch == 0 and cfg.eval_every == 0


def test_devices_this_machine_lacks_are_config_errors(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda': CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="device='tpu' is not one of"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="is not one of"):
        resolve_device("meta")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("override", ["data.scales=[224,Infinity]", "data.batch_size=NaN", "optim.epochs=-Infinity"])
def test_non_finite_values_in_integer_fields_are_config_errors(override):
    with pytest.raises(ConfigError, match="must be an integer"):
        make_config("small", overrides=[override])


def test_panoptic_and_oneshot_settings_are_config_sections():
    cfg = make_config("small", overrides=["panoptic.stage=2", "panoptic.threshold=0.5", "oneshot.num_draws=3"])
    assert cfg.panoptic.stage == "2" and cfg.panoptic.threshold == 0.5 and cfg.oneshot.num_draws == 3
    assert Config.from_dict(cfg.to_dict()).panoptic == cfg.panoptic  # saved and read back with the run
    for bad, message in (("panoptic.stage=3", "panoptic.stage='3' is not one of 1, 2, joint"),
                         ("panoptic.threshold=1.0", r"panoptic.threshold=1.0 must be in \[0, 1\)"),
                         ("panoptic.min_area=0", "panoptic.min_area=0 must be > 0"),
                         ("panoptic.loss_dice=-1", "must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            make_config("small", overrides=[bad])


def test_a_text_field_takes_an_override_that_reads_as_a_number():
    cfg = make_config("small", overrides=["output_dir=2024", "panoptic.stage=joint"])
    assert cfg.output_dir == "2024" and cfg.panoptic.stage == "joint"
