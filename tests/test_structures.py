"""Every key a dataset of this package puts in a target is declared, with its format, in ``structures.Target``."""

import json
import typing

import pytest

from updetr.presets import make_config
from updetr.data.embedded import embedded_data_overrides
from updetr.engine.tasks import build_task
from updetr.structures import Target

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.mark.parametrize("name", ["detection", "pretrain", "oneshot", "panoptic"])
def test_every_target_key_is_declared(name, embedded, tmp_path, tiny_overrides):
    declared = set(typing.get_type_hints(Target))
    if name == "pretrain":
        cfg = make_config("pretrain-small", overrides=tiny_overrides + [
            f"data.root={json.dumps(str(embedded))}", 'data.images="unlabeled"'])
    else:
        extra = ["panoptic.stage=joint"] if name == "panoptic" else []
        cfg = make_config("small", overrides=tiny_overrides + embedded_data_overrides(embedded) + extra)
    task = build_task(name, cfg)
    for dataset in (task.train_dataset(), task.val_dataset()):
        target = dataset[0][1]
        assert set(target) <= declared, f"{name}: undeclared target keys {sorted(set(target) - declared)}"
        assert {"boxes_cxcywh", "labels"} <= set(target) and "boxes_xyxy" not in target  # transformed: one format
