import logging
import os

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from updetr.config import DataConfig
from updetr.data.collate import collate_detection
from updetr.data.folder import ImageFolder
from updetr.data.io import DataError
from updetr.data.transforms import build_transforms
from updetr.structures import ImageBatch


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "b.jpg")
    Image.new("L", (10, 30), 128).save(tmp_path / "nested" / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "nested" / "deeper" / "c.JPEG")
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "nested" / "labels.json").write_text("{}")
    return tmp_path


def test_recursive_scan_skips_non_images(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="updetr.data.folder"):
        ds = ImageFolder(folder)
    assert [p.name for p in ds.paths] == ["b.jpg", "a.png", "c.JPEG"]  # sorted full paths
    assert ds.skipped_files == 2
    assert any("skipped 2 non-image files" in r.getMessage() for r in caplog.records)
    pixels, info = ds[1]
    assert pixels.shape == (3, 30, 10) and pixels.dtype == torch.float32
    assert info["image_id"].item() == 1 and info["orig_size"].tolist() == [30, 10]
    assert info["path"].endswith("a.png")


def test_eval_transform_and_list_input(folder):
    transforms = build_transforms(DataConfig(val_size=32, max_size=100), train=False)
    ds = ImageFolder([folder / "b.jpg", folder / "readme.txt"], transforms)
    assert len(ds) == 1 and ds.skipped_files == 1
    pixels, info = ds[0]
    assert pixels.shape == (3, 32, 64) and info["size"].tolist() == [32, 64] and info["orig_size"].tolist() == [20, 40]
    with pytest.raises(DataError, match="missing.jpg"):
        ImageFolder([folder / "missing.jpg"])
    with pytest.raises(DataError, match="no image files"):
        ImageFolder([folder / "readme.txt"])
    with pytest.raises(DataError, match="not found"):
        ImageFolder(folder / "absent")


def test_unreadable_image_raises_at_load_time(folder):
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ImageFolder(folder)
    ds[0]
    with pytest.raises(DataError, match="zz_broken.png"):
        ds[len(ds) - 1]


def test_collate_padding_mask_polarity():
    a, b = torch.ones(3, 4, 6), torch.full((3, 5, 3), 2.0)
    batch, targets = collate_detection([(a, {"image_id": torch.tensor(0)}), (b, {"image_id": torch.tensor(1)})])
    assert isinstance(batch, ImageBatch)
    assert batch.pixels.shape == (2, 3, 5, 6) and batch.padding_mask.shape == (2, 5, 6)
    assert batch.padding_mask.dtype == torch.bool
    assert not batch.padding_mask[0, :4, :6].any() and batch.padding_mask[0, 4:, :].all()  # True = padding
    assert not batch.padding_mask[1, :, :3].any() and batch.padding_mask[1, :, 3:].all()
    assert (batch.pixels[0, :, 4:] == 0).all() and (batch.pixels[1, :, :, :3] == 2).all()
    assert batch.image_sizes.tolist() == [[4, 6], [5, 3]]
    assert [t["image_id"].item() for t in targets] == [0, 1]
    batch, _ = collate_detection([(a, {})], size_divisibility=8)
    assert batch.pixels.shape[-2:] == (8, 8)


def test_dataloader(folder):
    ds = ImageFolder(folder, build_transforms(DataConfig(val_size=24, max_size=64), train=False))
    batch, infos = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_detection)))
    assert batch.pixels.shape[0] == 3 and len(infos) == 3
    for k, info in enumerate(infos):
        h, w = info["size"].tolist()
        assert batch.image_sizes[k].tolist() == [h, w]


def test_a_symlink_loop_is_walked_once(folder):
    """``ln -s . self`` made the walk recurse until the path length limit (hanging with two loops)."""
    os.symlink(".", folder / "self")
    os.symlink("..", folder / "nested" / "back_to_root")
    os.symlink(folder / "nested" / "deeper", folder / "second_link_to_deeper")
    ds = ImageFolder(folder)
    names = [p.name for p in ds.paths]
    assert sorted(names) == ["a.png", "b.jpg", "c.JPEG"]  # each real file once


def test_iter_usable_skips_unreadable_files_and_records_why(folder):
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")
    ds = ImageFolder(folder)
    skipped = []
    got = [(i, info["path"]) for i, _, info, image in ds.iter_usable(skipped)]
    assert [os.path.basename(p) for _, p in got] == ["b.jpg", "a.png", "c.JPEG"]
    assert sorted(os.path.basename(s["file"]) for s in skipped) == ["dangling.jpg", "zz_broken.png"]
    assert all(s["error"].startswith(s["file"]) for s in skipped)
