"""The CNN stage: reserved material only, the scene phase and the crop-context phase."""

import json

import numpy as np
import torch
from torch import nn

from updetr.backbone_pretrain import crop_context_loss, pretrain_backbone
from updetr.data.embedded import (EMBEDDED_THING_CLASSES, RESERVED_DIGIT_PARITY, render_reserved_class_maps,
                                   render_reserved_scenes, reserved_assets)
from updetr.models.backbone import Backbone, load_backbone_weights


def test_reserved_scenes_use_reserved_digits_and_are_deterministic():
    assets = reserved_assets()
    assert len(assets.digit_indices) > 0 and np.all(assets.digit_indices % 2 == RESERVED_DIGIT_PARITY)
    first = render_reserved_scenes(3, 64, seed=5)
    assert first.shape == (3, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, render_reserved_scenes(3, 64, seed=5))
    assert not np.array_equal(first, render_reserved_scenes(3, 64, seed=6))


def test_crop_context_loss_is_learnable():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1))
    scenes = torch.from_numpy(render_reserved_scenes(4, 64, seed=0)).permute(0, 3, 1, 2).float() / 255 - 0.5
    opt = torch.optim.Adam(trunk.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, match = crop_context_loss(trunk, scenes, 4, 16, torch.Generator().manual_seed(1))  # the same boxes
        assert torch.isfinite(loss) and 0.0 <= match <= 1.0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_cnn_stage_with_context_phase_reports_both_phases_and_loads(tmp_path):
    out = tmp_path / "cnn" / "resnet18.pth"
    summary = pretrain_backbone(out, num_images=64, size=32, epochs=1, batch_size=32, seed=0, progress=False,
                                context_steps=2, context_scenes=8, context_size=64, context_batch=4, context_boxes=2)
    assert summary["context_steps"] == 2 and 0.0 <= summary["context_match"] <= 1.0
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert json.loads(out.with_suffix(".json").read_text()) == summary
    backbone = Backbone("resnet18", trainable=False)
    load_backbone_weights(backbone, str(out))


def test_reserved_class_maps_fill_object_boxes_with_their_class():
    from updetr.data import embedded as emb

    images, maps = render_reserved_class_maps(6, 64, seed=3, object_size=(0.3, 0.5), max_objects=3)
    assert images.shape == (6, 64, 64, 3) and maps.shape == (6, 64, 64)
    background = len(EMBEDDED_THING_CLASSES)
    assets = reserved_assets()
    for i, image_map in enumerate(maps):  # the same scene, composed again with its instances
        scene = emb._compose(np.random.default_rng([3, emb._RESERVED_STREAM + 1, i]), assets, 64, 64,
                             object_size=(0.3, 0.5), max_objects=3)
        assert np.array_equal(scene.image, images[i])
        covered = np.zeros((64, 64), bool)
        for instance in scene.instances:
            x, y, w, h = emb._tight_box(instance.mask)
            covered[y:y + h, x:x + w] = True
        assert np.array_equal(image_map == background, ~covered)  # background exactly outside every box
        x, y, w, h = emb._tight_box(scene.instances[-1].mask)  # the topmost object owns its whole box
        assert np.all(image_map[y:y + h, x:x + w] == scene.instances[-1].class_index)
    again_images, again_maps = render_reserved_class_maps(6, 64, seed=3, object_size=(0.3, 0.5), max_objects=3)
    assert np.array_equal(images, again_images) and np.array_equal(maps, again_maps)
    # a stream of its own: not the scenes render_reserved_scenes gives for the same seed
    assert not np.array_equal(images[:3], render_reserved_scenes(3, 64, seed=3))


def test_cnn_stage_with_scene_phase_reports_it_and_loads(tmp_path):
    out = tmp_path / "cnn" / "resnet18.pth"
    summary = pretrain_backbone(out, num_images=64, size=32, epochs=1, batch_size=32, seed=0, progress=False,
                                scene_steps=3, scene_images=8, scene_size=64, scene_batch=4, scene_context_weight=0.5)
    assert summary["scene_steps"] == 3 and summary["scene_images"] == 8
    assert 0.0 <= summary["scene_object_accuracy"] <= 1.0
    assert summary["scene_context_weight"] == 0.5 and 0.0 <= summary["scene_context_match"] <= 1.0
    assert json.loads(out.with_suffix(".json").read_text()) == summary
    load_backbone_weights(Backbone("resnet18", trainable=False), str(out))


def test_crop_context_loss_reuses_a_given_feature_map():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    scenes = torch.from_numpy(render_reserved_scenes(2, 64, seed=0)).permute(0, 3, 1, 2).float() / 255 - 0.5
    own, _ = crop_context_loss(trunk, scenes, 3, 16, torch.Generator().manual_seed(2))
    given, _ = crop_context_loss(trunk, scenes, 3, 16, torch.Generator().manual_seed(2), fmap=trunk(scenes))
    other, _ = crop_context_loss(trunk, scenes, 3, 16, torch.Generator().manual_seed(2), fmap=trunk(scenes.flip(-1)))
    assert torch.allclose(own, given) and not torch.allclose(own, other)
