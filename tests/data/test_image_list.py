"""The image list of a folder tree (``updetr.data.image_list``): recursive, sorted, cached outside the tree."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from updetr.data import image_list as IL
from updetr.data.image_list import scan_images
from updetr.data.io import DataError


def _write(path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    _write(root / "a" / "one.png", 40, 60)
    _write(root / "a" / "two.PNG", 50, 30)
    _write(root / "b" / "c" / "three.jpg", 64, 64)
    _write(root / "four.bmp", 33, 45)
    (root / "notes.txt").write_text("not an image")
    return root


def _age(root, seconds=60):
    """Date every folder of the tree back, out of the cache's racy window (files just written)."""
    stamp = time.time() - seconds
    for d, _, _ in os.walk(root):
        os.utime(d, (stamp, stamp))


def test_scan_finds_images_recursively_sorted_and_caches_outside_the_folder(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("UPDETR_CACHE_DIR", str(tmp_path / "cache"))
    before = sorted(os.listdir(folder))
    files = scan_images(folder)
    relative = [os.path.relpath(f, folder) for f in files]
    assert relative == sorted(["a/one.png", "a/two.PNG", os.path.join("b", "c", "three.jpg"), "four.bmp"])
    assert all(os.path.isabs(f) for f in files)
    assert sorted(os.listdir(folder)) == before  # nothing is written into the user's image folder
    cache = IL.image_list_cache(str(folder))
    assert cache.parent == tmp_path / "cache" / "image-lists" and cache.is_file()
    assert f"root {folder}" in cache.read_text().splitlines()[1]


def test_scan_reuses_cache_without_walking(folder, monkeypatch):
    _age(folder)
    first = scan_images(folder)

    def no_walk(*args, **kwargs):
        raise AssertionError("the folder tree was walked again")

    monkeypatch.setattr(IL.os, "walk", no_walk)
    assert scan_images(folder) == first
    with pytest.raises(AssertionError, match="walked again"):
        scan_images(folder, refresh=True)


def test_scan_sees_images_added_or_removed_later(folder):
    _age(folder)
    assert len(scan_images(folder)) == 4
    _write(folder / "b" / "c" / "five.webp", 20, 20)  # deep in the tree: only that folder's mtime changes
    files = scan_images(folder)
    assert len(files) == 5 and str(folder / "b" / "c" / "five.webp") in files
    _age(folder)
    os.remove(folder / "a" / "one.png")
    os.makedirs(folder / "new" / "deeper")
    _write(folder / "new" / "deeper" / "six.png", 20, 20)
    relative = [os.path.relpath(f, folder) for f in scan_images(folder)]
    assert "a/one.png" not in relative and os.path.join("new", "deeper", "six.png") in relative and len(relative) == 5


def test_scan_rewalks_a_tree_changed_within_the_mtime_granularity(folder, monkeypatch):
    """A folder modified within 2 s of the scan may change again without a new mtime: walk again."""
    scan_images(folder)  # the fixture has just written the files
    walked = []
    real_walk = os.walk
    monkeypatch.setattr(IL.os, "walk", lambda *a, **k: walked.append(1) or real_walk(*a, **k))
    scan_images(folder)
    assert walked


def test_scan_with_cache_dir_and_an_unwritable_cache(folder, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    assert len(scan_images(folder, cache_dir)) == 4
    assert len(list(cache_dir.iterdir())) == 1
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache folder would be")
    with caplog.at_level(logging.INFO, logger="updetr.data.image_list"):
        assert len(scan_images(folder, blocker / "sub")) == 4  # works without a cache
    assert any("cannot write the image list cache" in r.getMessage() for r in caplog.records)


def test_scan_follows_symlinks_without_looping(folder):
    os.symlink(folder / "a", folder / "b" / "link_to_a")
    os.symlink(folder, folder / "b" / "c" / "loop")  # a cycle back to the root
    relative = [os.path.relpath(f, folder) for f in scan_images(folder, refresh=True)]
    assert len(relative) == len(set(relative))
    assert "a/one.png" in relative
    # each real folder is listed once, through whichever path the walk reached first
    assert sum(r.endswith("one.png") for r in relative) == 1


@pytest.mark.parametrize("content", [None, "text"])
def test_scan_error_names_folder_without_images(tmp_path, content):
    root = tmp_path / "nothing_here"
    root.mkdir()
    if content:
        (root / "readme.txt").write_text(content)
    with pytest.raises(DataError, match="nothing_here"):
        scan_images(root)


def test_missing_folder_error(tmp_path):
    with pytest.raises(DataError, match="does_not_exist"):
        scan_images(tmp_path / "does_not_exist")
