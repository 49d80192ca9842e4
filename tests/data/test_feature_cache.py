"""Cached frozen-CNN features (data.cache_features): same features and targets as the pixel path."""

import pytest
import torch

from updetr.presets import make_config
from updetr.data.build import build_detection_dataset
from updetr.data.embedded import embedded_data_overrides
from updetr.data.feature_cache import (
    FeatureStore,
    CachedDetection, CachedPretrainImages, collate_features, collate_features_with_patches, pretrain_feature_table,
)
from updetr.data.unlabeled import UnlabeledImages
from updetr.engine.detection import DetectionTask
from updetr.engine.distributed import DistInfo
from updetr.engine.loop import fit
from updetr.engine.pretrain import PretrainTask
from updetr.models import build_detr
from updetr.structures import FeatureBatch, ImageBatch

TINY = [
    "model.backbone=resnet18", "model.hidden_dim=32", "model.num_heads=4", "model.enc_layers=1",
    "model.dec_layers=2", "model.ffn_dim=64", "model.num_queries=8", "model.dropout=0.0",
    "pretrain.num_patches=2", "pretrain.query_size=32",
    "data.scales=[64,80]", "data.max_size=128", "data.crop_resize=[64]", "data.crop_size=[48,64]",
    "data.val_size=64", "data.batch_size=4", "data.num_workers=0", "optim.epochs=2", "optim.lr_backbone=0",
]


def detection_config(embedded, out, *extra):
    return make_config("small", overrides=TINY + embedded_data_overrides(embedded) + [f'output_dir="{out}"', *extra])


def frozen_detr(cfg):
    torch.manual_seed(0)
    return build_detr(cfg.model, 14, train_backbone=False).eval()


def test_feature_batch_pads_bottom_right_and_masks_padding():
    a, b = torch.ones(3, 2, 4), torch.full((3, 3, 2), 2.0)
    batch = FeatureBatch.from_tensors([a, b])
    assert batch.features.shape == (2, 3, 3, 4)
    assert torch.equal(batch.features[0, :, :2, :4], a) and batch.features[0, :, 2:].abs().sum() == 0
    assert torch.equal(batch.features[1, :, :3, :2], b) and batch.features[1, :, :, 2:].abs().sum() == 0
    assert batch.padding_mask[0].tolist() == [[False] * 4, [False] * 4, [True] * 4]
    assert batch.padding_mask[1].tolist() == [[False, False, True, True]] * 3


@pytest.mark.slow
def test_cached_features_give_the_pixel_path_outputs(embedded, tmp_path):
    """On an image whose sides are multiples of 64 (no padding anywhere), DETR on the cached
    features returns what DETR on the pixels returns; the mirrored view is the mirror image's."""
    cfg = detection_config(embedded, tmp_path)
    model = frozen_detr(cfg)
    val = build_detection_dataset(cfg.data, "val", augment=False)
    cached = CachedDetection(val, model, torch.device("cpu"), hflip=1.0, progress=False)
    pixels, target = val[0]
    crop = pixels[:, :64, :64]  # a 64 x 64 image: the cache's padding to 64 adds nothing
    with torch.no_grad():
        direct = model(ImageBatch.from_tensors([crop]))
        feats = list(model.backbone[0].body(crop[None].contiguous(memory_format=torch.channels_last)).values())[-1]
        via_cache = model(FeatureBatch(feats, torch.zeros(1, *feats.shape[-2:], dtype=torch.bool)))
    torch.testing.assert_close(via_cache.logits, direct.logits)
    torch.testing.assert_close(via_cache.boxes_cxcywh, direct.boxes_cxcywh)

    # the cache's own maps: image and mirror image, cropped to ceil(size / 32) cells
    h, w = (int(s) for s in target["size"])
    features, _ = cached[0]
    assert features.shape[-2:] == (-(-h // 32), -(-w // 32))
    padded = torch.zeros(1, 3, -(-h // 64) * 64, -(-w // 64) * 64)
    padded[0, :, :h, :w] = pixels.flip(-1)
    with torch.no_grad():
        expected = list(model.backbone[0].body(padded.contiguous(memory_format=torch.channels_last)).values())[-1][0]
    torch.testing.assert_close(features, expected[:, : features.shape[-2], : features.shape[-1]], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_flips_mirror_boxes_and_are_a_function_of_seed_epoch_index(embedded, tmp_path):
    cfg = detection_config(embedded, tmp_path)
    model = frozen_detr(cfg)
    train = build_detection_dataset(cfg.data, "train", augment=False)
    cached = CachedDetection(train, model, torch.device("cpu"), hflip=0.5, seed=3, progress=False)
    again = CachedDetection(train, model, torch.device("cpu"), hflip=0.5, seed=3, progress=False)
    flips = []
    for epoch in range(4):
        cached.set_epoch(epoch)
        again.set_epoch(epoch)
        for i in range(len(cached)):
            flipped = cached.flipped(i)
            assert flipped == again.flipped(i)
            flips.append(flipped)
            features, target = cached[i]
            _, plain = train[i]
            expected = plain["boxes_cxcywh"].clone()
            if flipped:
                expected[:, 0] = 1 - expected[:, 0]
            torch.testing.assert_close(target["boxes_cxcywh"], expected)
            assert torch.equal(target["labels"], plain["labels"])
            assert features is cached._features[i][int(flipped)]
    assert 0 < sum(flips) < len(flips)  # both views are used
    images, targets = collate_features([cached[0], cached[1]])
    assert isinstance(images, FeatureBatch) and images.features.shape[0] == 2 and len(targets) == 2


def test_a_trainable_cnn_cannot_be_cached(embedded, tmp_path):
    cfg = detection_config(embedded, tmp_path)
    model = build_detr(cfg.model, 14, train_backbone=True)
    val = build_detection_dataset(cfg.data, "val", augment=False)
    with pytest.raises(ValueError, match="frozen CNN"):
        CachedDetection(val, model, torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match="frozen backbone"):
        model(FeatureBatch(torch.zeros(1, 512, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool)))


@pytest.mark.slow
def test_pretraining_samples_keep_their_patches_and_use_the_cached_image(embedded, tmp_path):
    cfg = detection_config(embedded, tmp_path)
    model = frozen_detr(cfg)
    images = UnlabeledImages(embedded / "unlabeled", num_patches=2, query_size=32, scales=(64, 80), max_size=128, seed=5)
    table = pretrain_feature_table(images, model, torch.device("cpu"), 64, progress=False)
    assert sorted(table) == list(range(len(images)))
    cached = CachedPretrainImages(images, table)
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        for i in range(len(images)):
            image, target, patches = images[i]
            features, cached_target, cached_patches = cached[i]
            assert torch.equal(cached_patches, patches)  # same draws with and without the image
            assert torch.equal(cached_target["boxes_cxcywh"], target["boxes_cxcywh"])
            file_index, fixed = images.fixed_size_image(i, 64)
            assert min(cached_target["size"].tolist()) == 64 and cached_target["size"].tolist() == list(fixed.shape[-2:])
            assert features is table[file_index][0]
    batch, targets, patches = collate_features_with_patches([cached[0], cached[1]])
    assert isinstance(batch, FeatureBatch) and patches.shape == (2, 2, 3, 32, 32)


@pytest.mark.slow
def test_training_and_pretraining_run_on_cached_features(embedded, tmp_path):
    cfg = detection_config(embedded, tmp_path / "det", "data.cache_features=true")
    result = fit(DetectionTask(cfg), cfg, DistInfo(), progress=False)
    assert "AP" in result.final_metrics
    pre = make_config("pretrain-small", overrides=TINY + [
        f'data.root="{embedded}"', 'data.images="unlabeled"', f'output_dir="{tmp_path / "pre"}"',
        "data.cache_features=true", "optim.epochs=1"])
    result = fit(PretrainTask(pre), pre, DistInfo(), progress=False)
    assert 0.0 <= result.final_metrics["hit_rate"] <= 100.0


def test_cache_with_a_trainable_backbone_is_an_error(embedded, tmp_path):
    cfg = detection_config(embedded, tmp_path, "data.cache_features=true", "optim.lr_backbone=1e-5")
    with pytest.raises(ValueError, match="frozen CNN"):
        fit(DetectionTask(cfg), cfg, DistInfo(), progress=False)


@pytest.mark.slow
def test_one_shot_pairs_and_episodes_on_cached_features_match_the_pixel_path(embedded, tmp_path):
    """Same pairs, exemplar patches and targets as the uncached datasets; the image's features in place
    of its pixels (mirrored with its boxes when the cache draws a flip)."""
    from updetr.data.one_shot import CachedOneShot
    from updetr.engine.one_shot import OneShotTask

    cfg = detection_config(embedded, tmp_path, "data.cache_features=true", "pretrain.query_size=32")
    task = OneShotTask(cfg)
    train, val = task.train_dataset(), task.val_dataset()
    model = frozen_detr(cfg)
    cpu = torch.device("cpu")
    cached_train = CachedOneShot(train, CachedDetection(train.dataset, model, cpu, hflip=0.5, seed=3, progress=False))
    cached_val = CachedOneShot(val, CachedDetection(val.dataset, model, cpu, progress=False))
    flips = 0
    for epoch in (0, 1):
        cached_train.set_epoch(epoch)
        assert train.epoch == epoch
        for item in range(len(train)):
            pixels, target, patch = train[item]
            features, cached_target, cached_patch = cached_train[item]
            index = train.draw(item)[0]
            assert torch.equal(cached_patch, patch)
            assert cached_target["query_label"] == target["query_label"]
            assert cached_target["query_image_id"] == target["query_image_id"]
            assert (cached_target["labels"] == 0).all() and len(cached_target["boxes_cxcywh"]) == len(target["boxes_cxcywh"])
            flipped = cached_train.features.flipped(index)
            flips += flipped
            expected = target["boxes_cxcywh"].clone()
            if flipped:
                expected[:, 0] = 1.0 - expected[:, 0]
            assert torch.allclose(cached_target["boxes_cxcywh"], expected, atol=1e-6)
            assert features is cached_train.features._features[index][int(flipped)]
    assert 0 < flips < 2 * len(train)
    for episode in range(len(val)):
        pixels, target, patches = val[episode]
        features, cached_target, cached_patches = cached_val[episode]
        assert torch.equal(cached_patches, patches) and cached_patches.shape[0] == val.num_draws
        assert torch.equal(cached_target["boxes_cxcywh"], target["boxes_cxcywh"]) and cached_target["episode"] == episode
    batch, targets, patches = task.collate([cached_val[0], cached_val[1]])
    assert isinstance(batch, FeatureBatch) and patches.shape == (2, val.num_draws, 3, 32, 32)


@pytest.mark.slow
def test_one_shot_training_on_cached_features_evaluates_like_the_pixel_path(embedded, tmp_path):
    from updetr.engine.inference import evaluate_one_shot
    from updetr.engine.one_shot import OneShotTask

    cfg = detection_config(embedded, tmp_path / "os", "data.cache_features=true", "pretrain.query_size=32",
                           "optim.epochs=1")
    result = fit(OneShotTask(cfg), cfg, DistInfo(), progress=False)
    assert "AP50_seen" in result.final_metrics
    # the checkpoint evaluated on pixels: val images need no padding beyond the cache's, so the numbers agree
    on_pixels = evaluate_one_shot(str(tmp_path / "os" / "checkpoint.pth"), progress=False)
    for name in ("seen", "unseen"):
        assert on_pixels[f"{name}_AP50"] == pytest.approx(result.final_metrics[f"AP50_{name}"], abs=1e-6, nan_ok=True)
    assert on_pixels["seen_AP50"] == on_pixels["seen_AP50"]  # defined: the tiny val set has seen-class episodes


@pytest.mark.slow
def test_feature_store_reuses_maps_across_runs_and_keys_on_weights_and_pixels(embedded, tmp_path):
    """data.feature_cache_dir: a second cache of the same images and CNN reads every map from disk, equal to the
    first; other CNN weights or other pixels do not hit; a corrupt entry is recomputed."""
    cfg = detection_config(embedded, tmp_path)
    model = frozen_detr(cfg)
    val = build_detection_dataset(cfg.data, "val", augment=False)
    store = tmp_path / "store"
    first = CachedDetection(val, model, torch.device("cpu"), hflip=1.0, progress=False, store_dir=str(store))
    (folder,) = store.iterdir()
    assert len(list(folder.glob("*.pt"))) == 2 * len(val)  # every image and its mirror
    encoder_calls = []
    body = model.backbone[0].body
    hook = body.register_forward_hook(lambda *args: encoder_calls.append(1))
    second = CachedDetection(val, model, torch.device("cpu"), hflip=1.0, progress=False, store_dir=str(store))
    hook.remove()
    assert not encoder_calls  # nothing recomputed
    for i in range(len(val)):
        for view in (0, 1):
            assert torch.equal(first._features[i][view], second._features[i][view])

    other = frozen_detr(cfg)
    with torch.no_grad():
        other.backbone[0].body.conv1.weight.mul_(1.5)  # TINY's resnet18
    FeatureStore(store, other.backbone[0])
    assert len(list(store.iterdir())) == 2  # other weights: another folder

    entry = sorted(folder.glob("*.pt"))[0]
    entry.write_bytes(b"truncated")
    third = CachedDetection(val, model, torch.device("cpu"), hflip=1.0, progress=False, store_dir=str(store))
    for i in range(len(val)):
        assert torch.equal(first._features[i][0], third._features[i][0])
    torch.load(entry, weights_only=True)  # the corrupt entry was rewritten
    assert FeatureStore.pixels_key(torch.zeros(3, 4, 4)) != FeatureStore.pixels_key(torch.zeros(3, 4, 5))


@pytest.mark.slow
def test_cached_targets_do_not_hold_loader_workers_shared_memory(embedded, tmp_path):
    """Targets read through loader workers are copied out of shared memory: each shared tensor keeps a file
    open, and a cache of thousands of images would otherwise run out of file descriptors."""
    cfg = detection_config(embedded, tmp_path)
    model = frozen_detr(cfg)
    train = build_detection_dataset(cfg.data, "train", augment=False)
    cached = CachedDetection(train, model, torch.device("cpu"), num_workers=1, progress=False)
    _, target = cached[0]
    tensors = [v for v in target.values() if isinstance(v, torch.Tensor)]
    assert tensors and not any(t.is_shared() for t in tensors)
    torch.testing.assert_close(target["boxes_cxcywh"], train[0][1]["boxes_cxcywh"])


@pytest.mark.slow
def test_onnxruntime_engine_gives_the_torch_maps_and_keeps_its_own_store_entries(embedded, tmp_path, monkeypatch):
    """data.feature_engine: ONNX Runtime computes the frozen CNN's maps to within 1e-4 of PyTorch's; the store keeps
    each engine's maps apart (they are not bit-equal), auto takes ONNX Runtime on the CPU when it is installed."""
    import importlib.util

    from updetr.config import ConfigError

    cfg = detection_config(embedded, tmp_path)
    model = frozen_detr(cfg)
    val = build_detection_dataset(cfg.data, "val", augment=False)
    store, cpu = tmp_path / "store", torch.device("cpu")
    by_engine = {engine: CachedDetection(val, model, cpu, hflip=1.0, progress=False, store_dir=str(store),
                                         engine=engine) for engine in ("torch", "onnxruntime")}
    assert len(list(store.iterdir())) == 2
    for i in range(len(val)):
        for view in (0, 1):
            torch.testing.assert_close(by_engine["onnxruntime"]._features[i][view], by_engine["torch"]._features[i][view],
                                       atol=1e-4, rtol=1e-4)
    auto = CachedDetection(val, model, cpu, progress=False, store_dir=str(store), engine="auto")
    assert torch.equal(auto._features[0][0], by_engine["onnxruntime"]._features[0][0])  # read from its entries

    with pytest.raises(ValueError, match="feature_engine must be one of"):
        CachedDetection(val, model, cpu, progress=False, engine="tensorrt")
    with pytest.raises(ConfigError, match="feature_engine"):
        make_config("small", overrides=["data.feature_engine=tensorrt"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # as if it were not installed
    with pytest.raises(ValueError, match="pip install onnx onnxruntime"):
        CachedDetection(val, model, cpu, progress=False, engine="onnxruntime")
    without = CachedDetection(val, model, cpu, progress=False, store_dir=str(store), engine="auto")
    assert torch.equal(without._features[0][0], by_engine["torch"]._features[0][0])  # auto falls back to PyTorch
