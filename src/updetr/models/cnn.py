"""What every CNN backbone of the package shares: the frozen-or-trainable feature extractor contract.

A backbone is an ``nn.Module`` with a ``body`` that maps normalised pixels (B, 3, H, W) to a dict of
feature maps (last layer last), and these attributes:

    name          architecture name (``resnet50``, ``efficientnet_lite0``, ...)
    trainable     whether the layers after the stride-4 stage train
    strides       stride of each returned map, e.g. [32] or [4, 8, 16, 32]
    channels      channels of each returned map
    num_channels  channels of the last map (Cb)
    last_stage    4 (stride 32) or 3 (stride 16)

Input pixels are always ImageNet-normalised (``structures.IMAGENET_MEAN`` / ``IMAGENET_STD``); a body whose
weights expect another normalisation converts inside its forward, so data, caches and query patches are the same
for every architecture.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..serialization import CheckpointError, safe_torch_load
from ..structures import FeatureBatch, ImageBatch


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be obtained or do not fit the network."""


class CNNBackbone(nn.Module):
    """Base class: forward over an :class:`ImageBatch` (or cached :class:`FeatureBatch`), masks, crops."""

    body: nn.Module
    name: str
    trainable: bool
    strides: list[int]
    channels: list[int]
    num_channels: int
    last_stage: int

    unpadded: bool = False  # frozen CNN: run images grouped by their own (rounded) size, not the batch's

    @property
    def fixed_single_map(self) -> bool:
        """Frozen and returning only its last layer: one map per image that never changes, so it may be
        computed per image (``unpadded``) or once and cached (:class:`FeatureBatch`)."""
        return not self.trainable and len(self.strides) == 1

    def forward(self, images: ImageBatch | FeatureBatch) -> list[tuple[Tensor, Tensor]]:
        """Returns [(features (B, Cb_i, h_i, w_i), padding_mask (B, h_i, w_i))], last layer last.

        A :class:`FeatureBatch` holds this frozen CNN's features computed earlier (a cache); they
        are passed through as they are.
        """
        if isinstance(images, FeatureBatch):
            if not self.fixed_single_map:
                raise ValueError("precomputed CNN features need a frozen backbone that returns only its last layer")
            return [(images.features, images.padding_mask)]
        if self.unpadded and self.fixed_single_map:
            feats = {"0": self._unpadded_features(images)}
        else:
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                feats = self.body(images.pixels.contiguous(memory_format=torch.channels_last))
        out = []
        for feature in feats.values():
            mask = F.interpolate(images.padding_mask[None].float(), size=feature.shape[-2:])[0].bool()
            out.append((feature, mask))
        return out

    def _unpadded_features(self, images: ImageBatch, multiple: int = 64) -> Tensor:
        """The frozen CNN on each image's own area (rounded up to ``multiple``), not on the batch's padding.

        Multi-scale batches are about half padding (measured 49 % for the embedded recipe); a frozen
        CNN need not spend that work. Images with the same rounded size run together, so few distinct
        shapes reach the convolution kernels. Features outside an image's area are zero (masked).
        Near an image's right/bottom edge the values differ slightly from a padded-batch forward:
        they no longer depend on how large the other images of the batch are.
        """
        pixels, mask = images.pixels, images.padding_mask
        stride = self.strides[0]
        multiple = max(multiple, stride)
        batch, _, height, width = pixels.shape
        valid_h = (~mask).any(dim=2).sum(dim=1).tolist()
        valid_w = (~mask).any(dim=1).sum(dim=1).tolist()
        out = pixels.new_zeros(batch, self.num_channels, math.ceil(height / stride), math.ceil(width / stride))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(zip(valid_h, valid_w)):
            key = (min(height, math.ceil(max(h, 1) / multiple) * multiple), min(width, math.ceil(max(w, 1) / multiple) * multiple))
            groups.setdefault(key, []).append(i)
        with torch.no_grad():
            for (h, w), index in groups.items():
                crop = pixels[index, :, :h, :w].contiguous(memory_format=torch.channels_last)
                feature = list(self.body(crop).values())[-1]
                out[index, :, : feature.shape[-2], : feature.shape[-1]] = feature
        return out.contiguous(memory_format=torch.channels_last)

    def pooled_features(self, pixels: Tensor) -> Tensor:
        """Global-average-pooled last-layer features of un-padded crops: (P, 3, h, w) -> (P, Cb)."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            feature = list(self.body(pixels.contiguous(memory_format=torch.channels_last)).values())[-1]
        return feature.mean(dim=(2, 3))


def read_weights_file(path: Path, extra_globals: list[type] | None = None) -> object:
    """A backbone weight file read without executing anything in it; every problem one line naming the file.

    Missing, empty, text, truncated and code-carrying (refused for safety) files raise :class:`BackboneWeightsError`.
    """
    try:
        return safe_torch_load(path, what="backbone weights file", extra_globals=extra_globals or [])
    except CheckpointError as err:
        raise BackboneWeightsError(str(err)) from None


def check_state_keys(expected: dict, given: dict, source: str, name: str) -> None:
    """Strictness of a weight load: every expected key given, nothing extra, every shape equal; otherwise
    :class:`BackboneWeightsError` listing the keys (``source`` names the file, ``name`` the architecture)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shape_bad = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    if missing or unexpected or shape_bad:
        raise BackboneWeightsError(
            f"{source}: weights do not fit {name}: missing {show_keys(missing)}, "
            f"unexpected {show_keys(unexpected)}, wrong shape {show_keys(shape_bad)}"
        )


def show_keys(keys: list[str], limit: int = 6) -> str:
    """``a, b, c (+N more)`` for error messages; ``none`` for an empty list."""
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
