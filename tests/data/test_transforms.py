import numpy as np
import pytest
import torch
from PIL import Image

from updetr.box_ops import normalized_cxcywh_to_xyxy_px
from updetr.config import DataConfig
from updetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, build_transforms, resized_size

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _small_cfg(**overrides) -> DataConfig:
    cfg = DataConfig(
        scales=[96, 112, 128], max_size=200, crop_resize=[100, 120], crop_size=[60, 100], val_size=128, hflip=0.5
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _unnormalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels * STD + MEAN) * 255  # (3, H, W) in [0, 255]


def _target(boxes, h, w):
    n = len(boxes)
    return {
        "boxes_xyxy": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.arange(n),
        "area": torch.arange(n, dtype=torch.float32) + 100,
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "image_id": torch.tensor(7),
        "orig_size": torch.tensor([h, w]),
    }


def _white_rectangle(h, w, box):
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels)


def _white_extent(pixels: torch.Tensor):
    white = _unnormalise(pixels).mean(0) > 127  # (H, W)
    if not white.any():
        return None
    ys, xs = torch.nonzero(white, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_resized_size():
    assert resized_size(480, 640, 800, 1333) == (800, 1067)
    assert resized_size(100, 1000, 800, 1333) == (133, 1333)  # longest side capped
    assert resized_size(640, 480, 128, None) == (171, 128)


@pytest.mark.parametrize("seed", range(25))
def test_train_boxes_follow_the_image(seed):
    h, w, box = 90, 140, (30, 20, 100, 70)
    image = _white_rectangle(h, w, box)
    transform = build_transforms(_small_cfg(), train=True, generator=torch.Generator().manual_seed(seed))
    pixels, out = transform(image, _target([box], h, w))
    size = out["size"]
    assert pixels.shape == (3, *size.tolist()) and pixels.dtype == torch.float32
    assert out["size"].dtype == torch.int64
    assert min(size.tolist()) <= 128 and max(size.tolist()) <= 200
    assert out["orig_size"].tolist() == [h, w]
    extent = _white_extent(pixels)
    if len(out["boxes_cxcywh"]) == 0:  # the crop missed the rectangle
        assert extent is None or ((extent[2:] - extent[:2]) <= 2).any()
        return
    assert out["labels"].tolist() == [0] and out["area"].tolist() == [100.0]
    assert ((out["boxes_cxcywh"] >= 0) & (out["boxes_cxcywh"] <= 1)).all()
    box_px = normalized_cxcywh_to_xyxy_px(out["boxes_cxcywh"], size)[0]
    assert torch.allclose(box_px, extent, atol=1.5), (box_px, extent)


def test_large_scale_setting():
    h, w, box = 480, 640, (100, 50, 400, 300)
    image = _white_rectangle(h, w, box)
    for seed in range(3):
        transform = build_transforms(DataConfig(), train=True, generator=torch.Generator().manual_seed(seed))
        pixels, out = transform(image, _target([box], h, w))
        assert min(out["size"].tolist()) in DataConfig().scales and max(out["size"].tolist()) <= 1333
        if len(out["boxes_cxcywh"]):
            box_px = normalized_cxcywh_to_xyxy_px(out["boxes_cxcywh"], out["size"])[0]
            assert torch.allclose(box_px, _white_extent(pixels), atol=2.0)
    pixels, out = build_transforms(DataConfig(), train=False)(image, _target([box], h, w))
    assert out["size"].tolist() == [800, 1067]
    expected = torch.tensor([250 / 640, 175 / 480, 300 / 640, 250 / 480])  # cxcywh of the box
    torch.testing.assert_close(out["boxes_cxcywh"][0], expected)


def test_flip_maps_boxes():
    h, w = 60, 80
    cfg = _small_cfg(hflip=1.0, crop=False, scales=[60], max_size=1000)
    image = _white_rectangle(h, w, (10, 5, 30, 25))
    pixels, out = build_transforms(cfg, train=True)(image, _target([[10, 5, 30, 25], [70, 0, 80, 60]], h, w))
    assert out["size"].tolist() == [60, 80]
    expected_xyxy = torch.tensor([[50.0, 5, 70, 25], [0, 0, 10, 60]])
    torch.testing.assert_close(normalized_cxcywh_to_xyxy_px(out["boxes_cxcywh"], out["size"]), expected_xyxy)
    assert torch.equal(_white_extent(pixels), expected_xyxy[0])


def test_eval_is_deterministic_and_does_not_mutate_input():
    h, w = 50, 100
    target = _target([[0, 0, 100, 50]], h, w)
    before = {k: v.clone() for k, v in target.items()}
    transform = build_transforms(_small_cfg(val_size=64, max_size=1000), train=False)
    pixels, out = transform(_white_rectangle(h, w, (0, 0, 100, 50)), target)
    assert out["size"].tolist() == [64, 128]
    torch.testing.assert_close(out["boxes_cxcywh"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    assert "boxes_xyxy" not in out and "boxes_xyxy" in target  # converted, not copied; the input keeps its own
    for key, value in before.items():
        assert torch.equal(target[key], value)
    assert out["image_id"].item() == 7
    torch.testing.assert_close(_unnormalise(pixels).mean(), torch.tensor(255.0), atol=0.5, rtol=0)


def test_target_without_boxes():
    pixels, out = build_transforms(_small_cfg(), train=False)(Image.new("RGB", (30, 20)), {"image_id": torch.tensor(1)})
    assert set(out) == {"image_id", "size"} and out["size"].tolist() == [128, 192]


def _coordinate_image(h, w):
    """R = x, G = y: a pixel tells where it came from."""
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(w)[None, :]
    pixels[..., 1] = np.arange(h)[:, None]
    return Image.fromarray(pixels)


def test_crop_clips_and_removes_boxes_with_their_fields():
    """Crop 50x50 out of 100x100 without any resize; the top-left pixel tells the window."""
    h = w = 100
    boxes = [[0, 0, 100, 100], [10, 10, 30, 30], [60, 60, 95, 90], [20, 70, 45, 99], [0, 0, 5, 100]]
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = True
    removed_total = clipped_total = 0
    for seed in range(20):
        transform = DetectionTransform(
            train=True, scales=[50], max_size=None, hflip=0.0, crop=True, crop_resize=[100], crop_size=[50, 50],
            generator=torch.Generator().manual_seed(seed),
        )
        target = _target(boxes, h, w)
        target["masks"] = masks
        pixels, out = transform(_coordinate_image(h, w), target)
        assert out["size"].tolist() == [50, 50]
        coords = _unnormalise(pixels)[:2].round().long()  # (2, H, W) source x, y
        if coords[0, 0, 1] - coords[0, 0, 0] != 1:  # the no-crop branch: resized 100 -> 50
            assert len(out["boxes_cxcywh"]) == len(boxes)
            continue
        left, top = coords[:, 0, 0].tolist()
        window = torch.tensor([left, top, left, top], dtype=torch.float32)
        expected = (torch.tensor(boxes, dtype=torch.float32) - window).clamp(0, 50)
        keep = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
        got = normalized_cxcywh_to_xyxy_px(out["boxes_cxcywh"], out["size"])
        torch.testing.assert_close(got, expected[keep])
        assert out["labels"].tolist() == torch.arange(len(boxes))[keep].tolist()
        assert out["area"].tolist() == (torch.arange(len(boxes), dtype=torch.float32) + 100)[keep].tolist()
        assert len(out["iscrowd"]) == int(keep.sum())
        assert out["masks"].shape == (int(keep.sum()), 50, 50) and out["masks"].dtype == torch.bool
        torch.testing.assert_close(out["masks"].flatten(1).sum(1).float(), (got[:, 2:] - got[:, :2]).prod(1))
        removed_total += int((~keep).sum())
        clipped_total += int((expected[keep] != (torch.tensor(boxes, dtype=torch.float32) - window)[keep]).any(1).sum())
    assert removed_total > 0 and clipped_total > 0


def test_crop_size_larger_than_image_is_clamped():
    transform = DetectionTransform(
        train=True, scales=[64], max_size=100, crop=True, crop_resize=[40], crop_size=[384, 600],
        generator=torch.Generator().manual_seed(0),
    )
    for _ in range(10):
        pixels, out = transform(Image.new("RGB", (60, 40)), _target([[0, 0, 60, 40]], 40, 60))
        assert min(out["size"].tolist()) == 64 and max(out["size"].tolist()) <= 100
        assert len(out["boxes_cxcywh"]) == 1


def test_masks_follow_the_image():
    h, w, box = 70, 90, (20, 10, 60, 50)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[0, 10:50, 20:60] = True
    transform = build_transforms(_small_cfg(), train=True, generator=torch.Generator().manual_seed(3))
    for _ in range(8):
        target = _target([box], h, w)
        target["masks"] = mask
        pixels, out = transform(_white_rectangle(h, w, box), target)
        white = _unnormalise(pixels).mean(0) > 127  # (H, W)
        assert out["masks"].shape[-2:] == tuple(out["size"].tolist())
        if len(out["boxes_cxcywh"]):
            iou = (out["masks"][0] & white).sum() / (out["masks"][0] | white).sum()
            assert iou > 0.9
