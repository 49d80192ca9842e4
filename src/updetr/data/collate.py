"""Batching of detection samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from updetr.structures import ImageBatch, Target

__all__ = ["collate_detection", "collate_with_patches"]


def collate_detection(
    batch: Sequence[tuple[Tensor, Target]], size_divisibility: int = 1
) -> tuple[ImageBatch, list[Target]]:
    """``DataLoader`` collate function: pad images into an :class:`ImageBatch`.

    Args:
        batch: ``(pixels (3, H_i, W_i) float, target)`` pairs.
        size_divisibility: pad H and W up to a multiple of this (use ``functools.partial``).

    Returns:
        ``ImageBatch`` with ``pixels`` (B, 3, H, W) (bottom/right zero padding) and
        ``padding_mask`` (B, H, W) bool, **True on padding**; and the list of targets,
        unchanged, in batch order.
    """
    images = [item[0] for item in batch]
    targets: list[Any] = [item[1] for item in batch]
    return ImageBatch.from_tensors(images, size_divisibility=size_divisibility), targets


def collate_with_patches(
    batch: Sequence[tuple[Tensor, Target, Tensor]], size_divisibility: int = 1
) -> tuple[ImageBatch, list[Target], Tensor]:
    """Collate ``(pixels, target, patches)`` samples (UP-DETR pre-training, one-shot detection).

    Returns the padded :class:`ImageBatch` (``padding_mask`` True on padding), the targets,
    and the query patches stacked: (B, M, 3, q, q) or (B, 3, q, q), as each sample holds them.
    """
    images, targets, patches = zip(*batch)
    return ImageBatch.from_tensors(list(images), size_divisibility=size_divisibility), list(targets), torch.stack(patches)
