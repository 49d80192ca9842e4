"""Random query patches (``updetr.data.query_patches``): the paper's box bounds, and the SimCLR-style
augmentation against torchvision's ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F

from updetr.data import query_patches as QP
from updetr.data.query_patches import PatchAugmentation, sample_patch_boxes


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


def test_sample_patch_boxes_max_size_caps_the_sides_and_zero_is_the_papers_rule():
    paper = sample_patch_boxes(200, 250, 500, 8, np.random.default_rng(3))
    assert torch.equal(paper, sample_patch_boxes(200, 250, 500, 8, np.random.default_rng(3), max_size=0))
    capped = sample_patch_boxes(200, 250, 2000, 8, np.random.default_rng(3), max_size=40)
    sides = capped[:, 2:] - capped[:, :2]
    assert (sides >= 8).all() and (sides <= 40).all() and int(sides.max()) == 40
    assert (capped[:, 2] <= 249).all() and (capped[:, 3] <= 199).all() and (capped[:, :2] >= 0).all()
    fixed = sample_patch_boxes(200, 250, 300, 72, np.random.default_rng(3), max_size=72)
    assert ((fixed[:, 2:] - fixed[:, :2]) == 72).all()  # one square size: the resampling says nothing of the box
    assert len({tuple(b) for b in fixed[:, :2].tolist()}) > 200  # at many places
    small = sample_patch_boxes(20, 30, 50, 8, np.random.default_rng(3), max_size=100)  # cap above the image's bound
    assert ((small[:, 2:] - small[:, :2])[:, 1] <= 12).all()


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


@pytest.mark.parametrize("factor", [0.6, 0.95, 1.2, 1.4])
def test_jitter_ops_match_torchvision(factor, colourful):
    x = torch.from_numpy(colourful(20, 24, 5)).permute(2, 0, 1).float() / 255
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    out = x.clone()
    QP._brightness(out.numpy(), factor)
    assert torch.allclose(out, F.adjust_brightness(x, factor), atol=1e-6)
    out = x.clone()
    QP._contrast(out.numpy(), factor)
    assert torch.allclose(out, (factor * x + (1 - factor) * luma.mean()).clamp(0, 1), atol=1e-6)
    assert torch.allclose(out, F.adjust_contrast(x, factor), atol=1e-4)  # torchvision: 0.2989 red
    out = x.clone()
    QP._saturation(out.numpy(), factor)
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
    QP._hue(out.numpy(), shift)
    assert torch.allclose(out, F.adjust_hue(x, shift), atol=1e-5)


@pytest.mark.parametrize("size", [16, 24])
def test_blur_matches_reflect_padded_gaussian(size):
    sigma = torch.tensor([0.1, 0.7, 2.0])
    kernels = QP._blur_matrices(size, sigma)
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


def test_grayscale_and_blur_in_apply(colourful):
    x = torch.from_numpy(colourful(16, 16, 7)).permute(2, 0, 1).float() / 255
    params = PatchAugmentation(
        jitter=np.array([False]), order=np.array([[0, 1, 2, 3]]), factors=np.ones((1, 4)),
        gray=np.array([True]), blur=np.array([True]), sigma=np.array([1.5]),
    )
    out = x.clone()
    params.apply(out, 0)
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    kernel = QP._blur_matrices(16, torch.tensor([1.5]))[0]
    expected = (kernel @ luma @ kernel.T).expand(3, -1, -1)
    assert torch.allclose(out, expected, atol=1e-5)


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
def test_whole_patch_chain_matches_torchvision_reference(channels_last, colourful):
    """Every step, its order, the skipped clips and the shared work buffers, over many random draws."""
    rng = np.random.default_rng(3)
    params = PatchAugmentation.draw(60, rng)
    for i in range(60):
        x = torch.from_numpy(colourful(20, 20, i)).permute(2, 0, 1).float() / 255
        if i % 7 == 0:
            x[:, :4] = x[:1, :4]  # gray rows: zero chroma
        patch = x.clone() if channels_last else x.contiguous()  # clone keeps the channels-last strides
        params.apply(patch, i)
        assert torch.allclose(patch, _reference_chain(x, params, i), atol=2e-5), i


def test_hue_matches_torchvision_on_saturated_image_any_strides(colourful):
    x = torch.from_numpy(colourful(32, 40, 9)).permute(2, 0, 1).float() / 255  # channels-last strides
    for shift in np.linspace(-0.1, 0.1, 9):
        out = x.clone()
        QP._hue(out.numpy(), float(shift))
        assert torch.allclose(out, F.adjust_hue(x, float(shift)), atol=1e-5)
        assert out.min() >= 0 and out.max() <= 1
