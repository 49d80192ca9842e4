"""The backbone's folded frozen-BatchNorm arithmetic against torchvision's plain module-by-module forward."""

import pytest
import torch
from torchvision.models._utils import IntermediateLayerGetter

from updetr.models.backbone import Backbone


def _randomise_bn(backbone: Backbone) -> None:
    gen = torch.Generator().manual_seed(0)
    for module in backbone.modules():
        if hasattr(module, "running_var"):
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) * 1.5 + 0.5)
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_batchnorm_matches_plain_forward_and_gradients(name):
    torch.manual_seed(0)
    backbone = Backbone(name, trainable=True, return_interm_layers=True)
    _randomise_bn(backbone)
    x = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)

    folded = backbone.body(x)
    plain = IntermediateLayerGetter.forward(backbone.body, x)
    assert folded.keys() == plain.keys() == {"0", "1", "2", "3"}
    for key in folded:
        scale = plain[key].abs().max().item()
        assert torch.allclose(folded[key], plain[key], atol=1e-5 * scale, rtol=0)

    trainable = [p for p in backbone.parameters() if p.requires_grad]
    assert trainable  # layer2-4 convolutions
    grads_folded = torch.autograd.grad(sum((v * v).sum() for v in folded.values()), trainable)
    grads_plain = torch.autograd.grad(sum((v * v).sum() for v in plain.values()), trainable)
    for a, b in zip(grads_folded, grads_plain):
        assert torch.allclose(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)
    # the BatchNorm statistics stay buffers: nothing but convolution weights trains
    assert all(p.dim() == 4 for p in trainable)
