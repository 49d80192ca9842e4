"""What a resume may change (``updetr.engine.resume_rules``): honoured, kept from the checkpoint, or refused."""

import os

from updetr.presets import make_config
from updetr.engine.resume_rules import sort_changes


def cfg(*overrides):
    return make_config("small", overrides=list(overrides))


def test_schedule_changes_are_honoured_and_an_unchanged_config_has_none():
    stored = cfg()
    assert sort_changes(stored, cfg()) == (stored.to_dict(), {}, [])
    effective, honoured, refused = sort_changes(stored, cfg("optim.lr=0.001", "optim.epochs=50"))
    assert honoured == {"optim.lr": (0.0002, 0.001), "optim.epochs": (40, 50)} and not refused
    assert effective["optim"]["lr"] == 0.001


def test_an_architecture_change_and_a_frozen_cnn_made_trainable_are_refused():
    _, _, refused = sort_changes(cfg("model.hidden_dim=64"), cfg())
    assert refused == ["model.hidden_dim 64 -> 128"]
    _, honoured, refused = sort_changes(cfg("optim.lr_backbone=0"), cfg())
    assert "optim.lr_backbone" in honoured and "a frozen CNN cannot become trainable" in refused[0]


def test_initialisation_fields_keep_their_stored_value_unless_a_different_one_is_asked():
    effective, honoured, refused = sort_changes(cfg('init_from="runs/pre/checkpoint.pth"'), cfg())
    assert effective["init_from"] == "runs/pre/checkpoint.pth" and not honoured and not refused
    _, _, refused = sort_changes(cfg('init_from="a.pth"'), cfg('init_from="b.pth"'))
    assert len(refused) == 1 and refused[0].startswith("init_from 'a.pth' -> 'b.pth' (it only initialises a run")


def test_the_same_output_folder_spelled_another_way_is_no_change():
    relative = "runs/x"
    _, honoured, _ = sort_changes(cfg(f'output_dir="{relative}"'), cfg(f'output_dir="{os.path.abspath(relative)}"'))
    assert honoured == {}
