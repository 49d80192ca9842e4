"""The named recipes (``updetr.presets``): each builds a valid config, and make_config applies a file and overrides
over it in that order."""

import json

import pytest

from updetr.config import ConfigError
from updetr.presets import PRESETS, make_config


def test_every_preset_is_valid():
    for name in PRESETS:
        make_config(name)


def test_an_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose from small, r50"):
        make_config("nope")


def test_file_then_overrides_over_the_preset(tmp_path):
    path = tmp_path / "part.json"
    path.write_text(json.dumps({"optim": {"lr": 3e-4, "epochs": 5}}))
    cfg = make_config("embedded", file=str(path), overrides=["optim.epochs=7"])
    assert cfg.model.backbone == "efficientnet_lite0"  # the preset's
    assert cfg.optim.lr == 3e-4  # the file's
    assert cfg.optim.epochs == 7  # the override wins over the file
