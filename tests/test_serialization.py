"""Checkpoint files: safe loading with one-line messages, atomic and durable writing."""

import errno
import re
import os

import pytest
import torch

from updetr import serialization as C
from updetr.serialization import CheckpointError, load_checkpoint, save_checkpoint

_RAN = []


def _run():
    _RAN.append(True)
    return {}


class _Code:
    def __reduce__(self):
        return (_run, ())


def test_a_code_carrying_checkpoint_is_refused_for_safety_not_called_corrupt(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Code()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "evil.pth: not loaded, for safety" in message and "carries code or objects that are not plain data" in message
    assert "_run" in message  # names what it pickles
    assert "weights_only" not in message and "truncated" not in message and "\n" not in message
    assert not _RAN


@pytest.mark.parametrize("content, expected", [
    (b"", "the file is empty (0 bytes)"),
    (b"hello, this is text\n", "not a PyTorch checkpoint (it is a text file"),
    (b"\x00\x01\x02garbage", "not a PyTorch checkpoint (it is neither a zip archive nor a pickle"),
])
def test_unreadable_files_are_one_line_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="weights.pth: " + re.escape(expected)) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)


def test_a_truncated_checkpoint_says_so(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(CheckpointError, match=r"ckpt.pth: not a readable PyTorch checkpoint \(truncated or corrupt"):
        load_checkpoint(path)


def test_save_is_atomic_durable_and_names_the_file_when_the_disk_is_full(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(C.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    save_checkpoint(path, {"model": {"w": torch.full((2,), 2.0)}})
    assert len(synced) >= 2  # the file, then its folder entry

    def full(payload, f):
        f.write(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"checkpoint.pth: cannot write the checkpoint \(No space left on device\)"):
        save_checkpoint(path, {"model": {}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((2,), 2.0))  # the previous file is intact
    assert not (tmp_path / "checkpoint.pth.tmp").exists()
