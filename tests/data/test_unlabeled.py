"""UP-DETR pre-training data (``updetr.data.unlabeled``): samples, skipped files, randomness, collate, the image."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from updetr.data import unlabeled as U
from updetr.data.io import DataError
from updetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from updetr.data.unlabeled import UnlabeledImages, collate_pretrain
from updetr.structures import ImageBatch

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
SMALL = dict(num_patches=4, query_size=24, scales=(48, 56), max_size=80)  # fast settings


@pytest.fixture
def write_image(colourful):
    """``write_image(path, height, width, seed=0)``: a colourful test image saved at ``path`` (folders made)."""
    def write(path, height: int, width: int, seed: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(colourful(height, width, seed)).save(path)
    return write


@pytest.fixture
def folder(tmp_path, write_image):
    root = tmp_path / "images"
    write_image(root / "a" / "one.png", 40, 60, 1)
    write_image(root / "a" / "two.PNG", 50, 30, 2)
    write_image(root / "b" / "c" / "three.jpg", 64, 64, 3)
    write_image(root / "four.bmp", 33, 45, 4)
    (root / "notes.txt").write_text("not an image")
    return root


# ----------------------------------------------------------------------------- samples


@pytest.mark.parametrize("content", [None, "text"])
def test_a_folder_without_images_is_a_value_error(tmp_path, content):
    root = tmp_path / "nothing_here"
    root.mkdir()
    if content:
        (root / "readme.txt").write_text(content)
    with pytest.raises(ValueError, match="nothing_here"):  # DataError is a ValueError
        UnlabeledImages(root)


def test_sample_shapes_targets_and_boxes(folder):
    ds = UnlabeledImages(folder, **SMALL)
    assert len(ds) == 4
    for i in range(len(ds)):
        image, target, patches = ds[i]
        h, w = target["size"].tolist()
        oh, ow = target["orig_size"].tolist()
        assert image.shape == (3, h, w) and image.dtype == torch.float32 and image.is_contiguous()
        assert min(h, w) in SMALL["scales"] or max(h, w) == SMALL["max_size"]
        assert max(h, w) <= SMALL["max_size"]
        assert (oh, ow) == Image.open(ds.file(i)).size[::-1]
        assert patches.shape == (4, 3, 24, 24) and patches.dtype == torch.float32
        assert target["labels"].tolist() == [0] * 4 and target["labels"].dtype == torch.int64
        assert target["patch_index"].tolist() == [0, 1, 2, 3]
        assert target["iscrowd"].tolist() == [0] * 4 and int(target["image_id"]) == i
        boxes = target["boxes_cxcywh"]  # normalised cxcywh
        assert boxes.shape == (4, 4) and (boxes >= 0).all() and (boxes <= 1).all()
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        px = xyxy * torch.tensor([ow, oh, ow, oh])
        assert (px >= -1e-3).all() and (px[:, 2] <= ow).all() and (px[:, 3] <= oh).all()
        assert ((px[:, 2:] - px[:, :2]) >= 8 - 1e-3).all()
        assert torch.allclose(target["area"], (px[:, 2] - px[:, 0]) * (px[:, 3] - px[:, 1]), atol=1e-2)
        # the same normalised box in the resized image covers the resized region
        resized_px = xyxy * torch.tensor([w, h, w, h])
        assert (resized_px[:, 2] <= w + 1e-3).all() and (resized_px[:, 3] <= h + 1e-3).all()


def test_patch_is_resized_crop_of_its_box_without_augmentation(folder):
    ds = UnlabeledImages(folder, augment=False, **SMALL)
    for i in range(len(ds)):
        _, target, patches = ds[i]
        original = torch.from_numpy(np.array(Image.open(ds.file(i)).convert("RGB"))).permute(2, 0, 1)
        oh, ow = target["orig_size"].tolist()
        boxes = target["boxes_cxcywh"]
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        x0, y0, x1, y1 = (xyxy * torch.tensor([ow, oh, ow, oh])).round().long().T.tolist()
        for m in range(ds.num_patches):
            height, width = y1[m] - y0[m], x1[m] - x0[m]
            reference = F.resized_crop(original, y0[m], x0[m], height, width, [24, 24], antialias=True)
            reference = (reference.float() / 255 - MEAN) / STD
            assert torch.allclose(patches[m], reference, atol=1e-4), (i, m)


def test_augmented_boxes_equal_unaugmented_boxes(folder):
    plain = UnlabeledImages(folder, augment=False, **SMALL)
    augmented = UnlabeledImages(folder, augment=True, **SMALL)
    for i in range(len(plain)):
        a, b = plain[i], augmented[i]
        assert torch.equal(a[1]["boxes_cxcywh"], b[1]["boxes_cxcywh"]) and torch.equal(a[0], b[0])
        assert not torch.equal(a[2], b[2])


# ----------------------------------------------------------------------------- skipping


def test_small_and_corrupt_files_are_skipped_and_counted(folder, caplog, write_image):
    write_image(folder / "a" / "tiny.png", 16, 300)  # h <= 2 * min_patch_size
    (folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    data = (folder / "b" / "c" / "three.jpg").read_bytes()
    (folder / "b" / "c" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    ds = UnlabeledImages(folder, **SMALL)
    assert len(ds) == 7
    with caplog.at_level(logging.WARNING, logger="updetr.data.unlabeled"):
        samples = [ds[i] for i in range(len(ds))]
    assert dict(ds.skipped) == {"too_small": 1, "unreadable": 2}
    names = {os.path.basename(ds.file(i)) for i in ds._bad}
    assert names == {"tiny.png", "broken.jpg", "truncated.jpg"}
    assert "tiny.png" in caplog.text and "broken.jpg" in caplog.text and "truncated" in caplog.text
    used = {int(t["image_id"]) for _, t, _ in samples}
    assert not used & set(ds._bad) and len(used) == 4
    for i, (_, target, _) in enumerate(samples):  # a bad file is replaced by the next usable one
        if i in ds._bad:
            j = i
            while j in ds._bad:
                j = (j + 1) % len(ds)
            assert int(target["image_id"]) == j
    again = UnlabeledImages(folder, **SMALL)  # deterministic replacement, counted once per file
    for i in range(len(ds)):
        assert torch.equal(again[i][2], samples[i][2])
    assert sum(again.skipped.values()) == 3


def test_all_files_bad_is_a_clear_error(tmp_path, write_image):
    root = tmp_path / "all_bad"
    write_image(root / "tiny.png", 10, 10)
    (root / "broken.jpg").parent.mkdir(exist_ok=True)
    (root / "broken.jpg").write_bytes(b"nope")
    ds = UnlabeledImages(root, **SMALL)
    with pytest.raises(DataError, match="all_bad"):
        ds[0]


# ----------------------------------------------------------------------------- randomness


@pytest.mark.slow
def test_same_seed_epoch_index_same_sample_and_differences(folder):
    a = UnlabeledImages(folder, seed=3, **SMALL)
    b = UnlabeledImages(folder, seed=3, **SMALL)
    for i in range(len(a)):
        for x, y in zip(a[i], b[i]):
            if isinstance(x, dict):
                assert all(torch.equal(x[k], y[k]) for k in x)
            else:
                assert torch.equal(x, y)
    boxes = [a[i][1]["boxes_cxcywh"] for i in range(len(a))]
    assert all(not torch.equal(boxes[0], other) for other in boxes[1:])
    epoch0 = a[1]
    a.set_epoch(1)
    epoch1 = a[1]
    assert not torch.equal(epoch0[1]["boxes_cxcywh"], epoch1[1]["boxes_cxcywh"])
    a.set_epoch(0)
    assert torch.equal(a[1][2], epoch0[2])  # exact resume: (epoch, index) alone decides
    other_seed = UnlabeledImages(folder, seed=4, **SMALL)
    assert not torch.equal(other_seed[1][1]["boxes_cxcywh"], epoch0[1]["boxes_cxcywh"])


def test_dataloader_workers_match_single_process_and_never_repeat(folder):
    ds = UnlabeledImages(folder, seed=1, **SMALL)
    expected = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_pretrain)
    got = list(loader)
    for (batch, targets, patches), (image, target, patch) in zip(got, expected):
        assert torch.equal(patches[0], patch) and torch.equal(targets[0]["boxes_cxcywh"], target["boxes_cxcywh"])
    crops = [p[0] for _, _, p in got]
    assert all(not torch.equal(crops[0], c) for c in crops[1:])


# ----------------------------------------------------------------------------- collate


def test_collate_pads_and_marks_padding_true(folder):
    ds = UnlabeledImages(folder, **SMALL)
    samples = [ds[i] for i in range(3)]
    batch, targets, patches = collate_pretrain(samples)
    assert isinstance(batch, ImageBatch)
    max_h = max(s[0].shape[1] for s in samples)
    max_w = max(s[0].shape[2] for s in samples)
    assert batch.pixels.shape == (3, 3, max_h, max_w) and batch.padding_mask.shape == (3, max_h, max_w)
    assert patches.shape == (3, 4, 3, 24, 24) and len(targets) == 3
    for b, (image, target, patch) in enumerate(samples):
        h, w = image.shape[1:]
        assert not batch.padding_mask[b, :h, :w].any()  # False on the image
        assert batch.padding_mask[b, h:, :].all() and batch.padding_mask[b, :, w:].all()  # True on padding
        assert torch.equal(batch.pixels[b, :, :h, :w], image) and torch.equal(patches[b], patch)
        assert target["size"].tolist() == [h, w]


# ----------------------------------------------------------------------------- augmented patches


@pytest.mark.slow
def test_about_a_fifth_of_patches_are_grayscale(folder):
    ds = UnlabeledImages(folder, num_patches=40, query_size=16, scales=(48,), max_size=80)
    patches = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        patches += [ds[i][2] for i in range(len(ds))]
    patches = torch.cat(patches)
    pixels = patches * STD + MEAN  # (N, 3, q, q) in [0, 1]
    gray = (pixels - pixels.mean(dim=1, keepdim=True)).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert patches.shape[0] == 480
    assert 0.14 < gray.float().mean() < 0.26
    assert pixels.min() > -1e-4 and pixels.max() < 1 + 1e-4


def test_from_config_uses_pretrain_and_data_sections(folder):
    from updetr.presets import make_config

    cfg = make_config("small", overrides=[f"data.images={folder}", "data.scales=[48, 56]", "data.max_size=80"])
    ds = UnlabeledImages.from_config(cfg)
    assert ds.num_patches == cfg.pretrain.num_patches and ds.query_size == cfg.pretrain.query_size
    assert ds.scales == (48, 56) and ds.seed == cfg.seed
    image, target, patches = ds[0]
    assert patches.shape == (cfg.pretrain.num_patches, 3, cfg.pretrain.query_size, cfg.pretrain.query_size)
    assert min(target["size"].tolist()) in (48, 56) or max(target["size"].tolist()) == 80


def test_image_is_normalised_resize_in_row_blocks(folder, monkeypatch):
    monkeypatch.setattr(U, "_CHUNK", 3 * 50)  # a few rows per block, so blocks and a partial last block occur
    ds = UnlabeledImages(folder, scales=(48, 56), max_size=80, query_size=16)
    for i in range(len(ds)):
        image, target, _ = ds[i]
        original = torch.from_numpy(np.array(Image.open(ds.file(i)).convert("RGB"))).permute(2, 0, 1)
        channels_last = original[None].contiguous(memory_format=torch.channels_last)
        reference = F.resize(channels_last, target["size"].tolist(), antialias=True)[0]
        reference = (reference.float() / 255 - MEAN) / STD
        assert image.is_contiguous() and torch.allclose(image, reference, atol=1e-5), i


def test_the_pixel_limit_is_enforced_before_decoding_for_jpeg_too(tmp_path, monkeypatch, caplog, write_image):
    """libjpeg-turbo's path bypassed Pillow's decompression-bomb guard: a 20000² JPEG was decoded."""
    root = tmp_path / "imgs"
    write_image(root / "small.png", 20, 20, 1)
    write_image(root / "big.jpg", 64, 64, 2)
    write_image(root / "big.png", 64, 64, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64² = 4096 pixels is "too many" now

    def no_decode(*args, **kwargs):
        raise AssertionError("an image over the pixel limit reached the decoder")

    monkeypatch.setattr(U, "decode_jpeg", no_decode)
    for name in ("big.jpg", "big.png"):
        with pytest.raises(DataError, match=f"{name}: image .*is larger than the limit of 1000 pixels; not decoded"):
            U._decode_rgb(str(root / name))
    with caplog.at_level(logging.WARNING, logger="updetr.data.unlabeled"):
        ds = UnlabeledImages(root, num_patches=1, query_size=8, min_patch_size=4, scales=(20,), max_size=40, augment=False)
        for i in range(len(ds)):
            _, target, _ = ds[i]
            assert int(target["image_id"]) == ds.files.index(str(root / "small.png"))
    assert ds.skipped["unreadable"] == 2
