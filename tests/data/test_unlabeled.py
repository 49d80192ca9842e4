"""UP-DETR pre-training data: folder scanning, patch sampling, augmentation, collate."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision.transforms.v2 import functional as F

from updetr.data import unlabeled as U
from updetr.data.io import DataError
from updetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from updetr.data.unlabeled import (
    PatchAugmentation,
    UnlabeledImages,
    collate_pretrain,
    sample_patch_boxes,
    scan_images,
)
from updetr.structures import ImageBatch

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
SMALL = dict(num_patches=4, query_size=24, scales=(48, 56), max_size=80)  # fast settings


def _colourful(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth, saturated (h, w, 3) uint8 image (varied hues, so colour ops show)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [np.sin(6 * x + 4 * y + p) for p in phase]
    return ((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8)


def _write(path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_colourful(height, width, seed)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    _write(root / "a" / "one.png", 40, 60, 1)
    _write(root / "a" / "two.PNG", 50, 30, 2)
    _write(root / "b" / "c" / "three.jpg", 64, 64, 3)
    _write(root / "four.bmp", 33, 45, 4)
    (root / "notes.txt").write_text("not an image")
    return root


# ----------------------------------------------------------------------------- scanning


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
    cache = U.image_list_cache(str(folder))
    assert cache.parent == tmp_path / "cache" / "image-lists" and cache.is_file()
    assert f"root {folder}" in cache.read_text().splitlines()[1]


def test_scan_reuses_cache_without_walking(folder, monkeypatch):
    _age(folder)
    first = scan_images(folder)

    def no_walk(*args, **kwargs):
        raise AssertionError("the folder tree was walked again")

    monkeypatch.setattr(U.os, "walk", no_walk)
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
    monkeypatch.setattr(U.os, "walk", lambda *a, **k: walked.append(1) or real_walk(*a, **k))
    scan_images(folder)
    assert walked


def test_scan_with_cache_dir_and_an_unwritable_cache(folder, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    assert len(scan_images(folder, cache_dir)) == 4
    assert len(list(cache_dir.iterdir())) == 1
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache folder would be")
    with caplog.at_level(logging.INFO, logger="updetr.data.unlabeled"):
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
    with pytest.raises(ValueError, match="nothing_here"):  # DataError is a ValueError
        UnlabeledImages(root)


def test_missing_folder_error(tmp_path):
    with pytest.raises(DataError, match="does_not_exist"):
        scan_images(tmp_path / "does_not_exist")


# ----------------------------------------------------------------------------- patch sampling


def test_sample_patch_boxes_matches_paper_bounds():
    rng = np.random.default_rng(0)
    for height, width in [(17, 17), (40, 25), (300, 500)]:
        boxes = sample_patch_boxes(height, width, 2000, 8, rng)
        sides = boxes[:, 2:] - boxes[:, :2]
        assert boxes.dtype == torch.int64 and boxes.shape == (2000, 4)
        assert (sides >= 8).all()
        assert (sides[:, 0] <= width - 8).all() and (sides[:, 1] <= height - 8).all()
        assert (boxes[:, :2] >= 0).all()
        # np.random.randint(w - sw): the box never reaches the last column / row
        assert (boxes[:, 2] <= width - 1).all() and (boxes[:, 3] <= height - 1).all()
    boxes = sample_patch_boxes(40, 25, 5000, 8, rng)
    assert int(boxes[:, 2].max()) == 24 and int((boxes[:, 2] - boxes[:, 0]).max()) == 17


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


def test_small_and_corrupt_files_are_skipped_and_counted(folder, caplog):
    _write(folder / "a" / "tiny.png", 16, 300)  # h <= 2 * min_patch_size
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


def test_all_files_bad_is_a_clear_error(tmp_path):
    root = tmp_path / "all_bad"
    _write(root / "tiny.png", 10, 10)
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


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_parameter_frequencies_and_ranges():
    params = PatchAugmentation.draw(20000, np.random.default_rng(0))
    assert abs(params.jitter.mean() - 0.8) < 0.015
    assert abs(params.gray.mean() - 0.2) < 0.015
    assert abs(params.blur.mean() - 0.5) < 0.015
    assert (np.sort(params.order, axis=1) == np.arange(4)).all()  # permutations
    assert abs((params.order[:, 0] == 3).mean() - 0.25) < 0.015  # hue first a quarter of the time
    f = params.factors
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and abs(f[:, 3]).max() <= 0.1
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0


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


@pytest.mark.parametrize("factor", [0.6, 0.95, 1.2, 1.4])
def test_jitter_ops_match_torchvision(factor):
    x = torch.from_numpy(_colourful(20, 24, 5)).permute(2, 0, 1).float() / 255
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    out = x.clone()
    U._brightness(out.numpy(), factor)
    assert torch.allclose(out, F.adjust_brightness(x, factor), atol=1e-6)
    out = x.clone()
    U._contrast(out.numpy(), factor)
    assert torch.allclose(out, (factor * x + (1 - factor) * luma.mean()).clamp(0, 1), atol=1e-6)
    assert torch.allclose(out, F.adjust_contrast(x, factor), atol=1e-4)  # torchvision: 0.2989 red
    out = x.clone()
    U._saturation(out.numpy(), factor)
    assert torch.allclose(out, (factor * x + (1 - factor) * luma).clamp(0, 1), atol=1e-6)
    assert torch.allclose(out, F.adjust_saturation(x, factor), atol=1e-4)


@pytest.mark.parametrize("shift", [-0.1, -0.04, 0.0, 0.03, 0.1])
def test_hue_matches_torchvision_including_ties(shift):
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, 0] = x[0:1, 0]  # gray
    x[2, 1] = x[0, 1]  # red = blue
    x[1, 2] = x[0, 2]  # red = green
    x[2, 3] = x[1, 3]  # green = blue
    x = (x * 255).round() / 255
    out = x.clone()
    U._hue(out.numpy(), shift)
    assert torch.allclose(out, F.adjust_hue(x, shift), atol=1e-5)


@pytest.mark.parametrize("size", [16, 24])
def test_blur_matches_reflect_padded_gaussian(size):
    sigma = torch.tensor([0.1, 0.7, 2.0])
    kernels = U._blur_matrices(size, sigma)
    x = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    for kernel, s in zip(kernels, sigma.tolist()):
        radius = size - 1
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        w = torch.exp(-0.5 * (offsets / s) ** 2)
        w /= w.sum()
        padded = nnf.pad(x[None], (radius,) * 4, mode="reflect")
        ref = nnf.conv2d(padded, w.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        ref = nnf.conv2d(ref, w.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]
        assert torch.allclose(kernel @ x @ kernel.T, ref, atol=1e-5)
        assert torch.allclose(kernel.sum(1), torch.ones(size), atol=1e-5)
    assert torch.allclose(kernels[0], torch.eye(size), atol=1e-6)  # sigma 0.1: nearly identity


def test_grayscale_and_blur_in_apply():
    x = torch.from_numpy(_colourful(16, 16, 7)).permute(2, 0, 1).float() / 255
    params = PatchAugmentation(
        jitter=np.array([False]), order=np.array([[0, 1, 2, 3]]), factors=np.ones((1, 4)),
        gray=np.array([True]), blur=np.array([True]), sigma=np.array([1.5]),
    )
    out = x.clone()
    params.apply(out, 0)
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    kernel = U._blur_matrices(16, torch.tensor([1.5]))[0]
    expected = (kernel @ luma @ kernel.T).expand(3, -1, -1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_from_config_uses_pretrain_and_data_sections(folder):
    from updetr.config import make_config

    cfg = make_config("small", overrides=[f"data.images={folder}", "data.scales=[48, 56]", "data.max_size=80"])
    ds = UnlabeledImages.from_config(cfg)
    assert ds.num_patches == cfg.pretrain.num_patches and ds.query_size == cfg.pretrain.query_size
    assert ds.scales == (48, 56) and ds.seed == cfg.seed
    image, target, patches = ds[0]
    assert patches.shape == (cfg.pretrain.num_patches, 3, cfg.pretrain.query_size, cfg.pretrain.query_size)
    assert min(target["size"].tolist()) in (48, 56) or max(target["size"].tolist()) == 80


def _reference_chain(x: torch.Tensor, params: PatchAugmentation, i: int) -> torch.Tensor:
    """Patch i's augmentation from torchvision's functional ops (PIL luma weights for contrast/saturation/gray)."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    if params.jitter[i]:
        for op in params.order[i]:
            f = float(params.factors[i, op])
            if op == 0:
                x = F.adjust_brightness(x, f)
            elif op == 1:
                x = (f * x + (1 - f) * (x * weights).sum(0).mean()).clamp(0, 1)
            elif op == 2:
                x = (f * x + (1 - f) * (x * weights).sum(0, keepdim=True)).clamp(0, 1)
            else:
                x = F.adjust_hue(x, f)
    if params.gray[i]:
        x = (x * weights).sum(0, keepdim=True).expand(3, -1, -1)
    if params.blur[i]:
        size, s = x.shape[-1], float(params.sigma[i])
        offsets = torch.arange(-(size - 1), size, dtype=torch.float32)
        w = torch.exp(-0.5 * (offsets / s) ** 2)
        w /= w.sum()
        padded = nnf.pad(x[None], (size - 1,) * 4, mode="reflect")
        x = nnf.conv2d(padded, w.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        x = nnf.conv2d(x, w.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]
    return x


@pytest.mark.slow  # 0.4 s each on an idle core, 2-5 s on a busy machine (120 small torchvision calls)
@pytest.mark.parametrize("channels_last", [False, True])
def test_whole_patch_chain_matches_torchvision_reference(channels_last):
    """Every step, its order, the skipped clips and the shared work buffers, over many random draws."""
    rng = np.random.default_rng(3)
    params = PatchAugmentation.draw(60, rng)
    for i in range(60):
        x = torch.from_numpy(_colourful(20, 20, i)).permute(2, 0, 1).float() / 255
        if i % 7 == 0:
            x[:, :4] = x[:1, :4]  # gray rows: zero chroma
        patch = x.clone() if channels_last else x.contiguous()  # clone keeps the channels-last strides
        params.apply(patch, i)
        assert torch.allclose(patch, _reference_chain(x, params, i), atol=2e-5), i


def test_hue_matches_torchvision_on_saturated_image_any_strides():
    x = torch.from_numpy(_colourful(32, 40, 9)).permute(2, 0, 1).float() / 255  # channels-last strides
    for shift in np.linspace(-0.1, 0.1, 9):
        out = x.clone()
        U._hue(out.numpy(), float(shift))
        assert torch.allclose(out, F.adjust_hue(x, float(shift)), atol=1e-5)
        assert out.min() >= 0 and out.max() <= 1


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


def test_the_pixel_limit_is_enforced_before_decoding_for_jpeg_too(tmp_path, monkeypatch, caplog):
    """libjpeg-turbo's path bypassed Pillow's decompression-bomb guard: a 20000² JPEG was decoded."""
    root = tmp_path / "imgs"
    _write(root / "small.png", 20, 20, 1)
    _write(root / "big.jpg", 64, 64, 2)
    _write(root / "big.png", 64, 64, 3)
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
