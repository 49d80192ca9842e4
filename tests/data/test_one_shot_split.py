"""The one-shot split (``updetr.data.one_shot_split``): every way to name it, and the errors."""

import json

import pytest

from updetr.data.io import DataError
from updetr.data.one_shot_split import PAPER_VOC_SPLIT, OneShotSplit, load_oneshot_split
from updetr.data.voc import VOC_CLASSES

CLASSES = ["a", "b", "c", "d"]


def test_split_specs_and_unknown_class_names(tmp_path):
    assert load_oneshot_split("voc", VOC_CLASSES) == PAPER_VOC_SPLIT
    assert len(PAPER_VOC_SPLIT.seen) == 16 and set(PAPER_VOC_SPLIT.unseen) == {"cow", "sheep", "cat", "aeroplane"}
    assert load_oneshot_split("", VOC_CLASSES, data_format="voc") == PAPER_VOC_SPLIT
    assert load_oneshot_split("unseen=c", CLASSES) == OneShotSplit(("a", "b", "d"), ("c",))
    (tmp_path / "oneshot_split.json").write_text(json.dumps({"seen": ["a"], "unseen": ["b"]}))
    assert load_oneshot_split("", CLASSES, data_root=str(tmp_path)).unseen == ("b",)
    assert load_oneshot_split(str(tmp_path), CLASSES).seen == ("a",)
    with pytest.raises(DataError, match="'zebra', not a class"):
        load_oneshot_split({"seen": ["a", "zebra"], "unseen": ["c"]}, CLASSES)
    with pytest.raises(DataError, match="'cow'"):
        load_oneshot_split("voc", CLASSES)
    with pytest.raises(DataError, match="both seen and unseen"):
        OneShotSplit(("a", "c"), ("c",))
    with pytest.raises(DataError, match="no one-shot split given"):
        load_oneshot_split("", CLASSES)
