"""One-shot detection data (paper §3.2, §4.3; docs/method.md §3), following CoAE's protocol.

**Split.** Classes are *seen* (trained on) or *unseen* (evaluated only):
``updetr.data.one_shot_split`` (:class:`OneShotSplit`, :func:`load_oneshot_split`).

**Exemplars** (query patches) are ground-truth boxes: never crowd / VOC-difficult, both
sides at least ``min_exemplar_size`` pixels of the original image (:class:`ExemplarBank`); a
patch is cut from its box by ``updetr.data.exemplar_patches``.

**Training pairs** (:class:`OneShotTrainDataset`): for each training image, one seen class
present in it is drawn, a query patch of that class is cropped from a *different* image's
box, and only that class's boxes stay as targets, with label 0 ("matches the query").
Unseen-class objects are never queries or targets (they are background). Images with no
usable seen class are skipped: images showing only unseen classes, images without objects,
and images whose seen classes have no exemplar in any other image. With
``exclude_unseen_images`` images showing any unseen object are skipped too (stricter than
CoAE). Draws come from ``numpy.random.default_rng((seed, epoch, index))``; the image
augmentation is DETR's (the dataset's own transforms).

**Evaluation episodes** (:class:`OneShotEpisodes`): for every test image and every
evaluated class with a non-crowd box in it, ``num_draws`` (5) query patches of that class
from other images: the class's exemplars (target image excluded) are shuffled by
``numpy.random.default_rng(image_id)`` and the first ``num_draws`` taken (cycling when
fewer exist). Fully deterministic.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from updetr.data.coco import CocoStyleDataset
from updetr.data.collate import collate_with_patches
from updetr.data.exemplar_patches import crop_patch_uint8, load_pixels, normalize_patch
from updetr.data.io import DataError
from updetr.data.one_shot_split import OneShotSplit, load_oneshot_split
from updetr.structures import ImageBatch, Target

__all__ = [
    "ExemplarBank", "OneShotTrainDataset", "OneShotEpisodes", "CachedOneShot", "collate_one_shot",
    # re-exported: engine.one_shot imports the split from here
    "OneShotSplit", "load_oneshot_split",
]  # fmt: skip

logger = logging.getLogger(__name__)

_CROP_CACHE = 1024  # evaluation keeps this many uint8 exemplar crops per process


class ExemplarBank:
    """The boxes of ``dataset`` usable as query patches, per class label.

    ``image_index[label]``: int64 (E,) item index of each exemplar; ``boxes_xyxy[label]``: float
    (E, 4), pixels of the original image; in dataset order.
    """

    def __init__(self, dataset: CocoStyleDataset, labels: Iterable[int], min_size: int) -> None:
        self.dataset = dataset
        wanted = set(labels)
        index: dict[int, list[int]] = {c: [] for c in wanted}
        boxes: dict[int, list[Tensor]] = {c: [] for c in wanted}
        for i in range(len(dataset)):
            target = dataset.raw_target(i)
            sides = target["boxes_xyxy"][:, 2:] - target["boxes_xyxy"][:, :2]  # (N, 2) w, h
            usable = (target["iscrowd"] == 0) & (sides >= min_size).all(dim=1)
            for n in torch.nonzero(usable).flatten().tolist():
                label = int(target["labels"][n])
                if label in wanted:
                    index[label].append(i)
                    boxes[label].append(target["boxes_xyxy"][n])
        self.image_index = {c: np.asarray(index[c], dtype=np.int64) for c in wanted}
        self.boxes_xyxy = {c: torch.stack(boxes[c]) if boxes[c] else torch.zeros((0, 4)) for c in wanted}
        self._cache: OrderedDict[tuple[int, int], Tensor] = OrderedDict()

    def candidates(self, label: int, exclude_index: int | None) -> np.ndarray:
        """Positions (into this class's exemplars) not taken from item ``exclude_index``."""
        return np.flatnonzero(self.image_index[label] != (-1 if exclude_index is None else exclude_index))

    def describe(self, label: int, position: int) -> dict:
        i = int(self.image_index[label][position])
        return {"image_id": int(self.dataset.image_ids[i]), "box_xyxy_px": self.boxes_xyxy[label][position].tolist()}

    def patch(self, label: int, position: int, query_size: int, cache: bool = False) -> Tensor:
        """The normalised (3, q, q) query patch of exemplar ``position`` of ``label``."""
        key = (label, position)
        crop = self._cache.get(key) if cache else None
        if crop is None:
            pixels = load_pixels(self.dataset, int(self.image_index[label][position]))
            crop = crop_patch_uint8(pixels, self.boxes_xyxy[label][position].tolist(), query_size)
            if cache:
                self._cache[key] = crop
                if len(self._cache) > _CROP_CACHE:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return normalize_patch(crop)


def _present_labels(target: Target) -> set[int]:
    return set(target["labels"][target["iscrowd"] == 0].tolist())


# ----------------------------------------------------------------------------- training


class OneShotTrainDataset(Dataset):
    """(image, target of the query's class, query patch) training pairs; see the module docstring.

    Args:
        dataset: the training set, with its train transforms attached.
        split: seen / unseen classes (validated against ``dataset.classes``).
        query_size: side of the square query patch.
        min_exemplar_size: smallest exemplar box side (pixels of the original image).
        seed: base of the per-sample generators.
        exclude_unseen_images: also skip images showing any unseen object.

    ``dataset[i]`` is ``(pixels (3, H, W), target, patch (3, q, q))``: ``target`` keeps only
    the query class's boxes (normalised cxcywh) with ``labels`` 0, plus ``query_label`` (the
    class's index in ``classes``) and ``query_image_id`` (where the patch came from).
    ``skipped`` counts the skipped images by reason.
    """

    def __init__(
        self,
        dataset: CocoStyleDataset,
        split: OneShotSplit,
        *,
        query_size: int,
        min_exemplar_size: int,
        seed: int = 0,
        exclude_unseen_images: bool = False,
    ) -> None:
        self.dataset = dataset
        self.split = split
        seen, unseen = split.labels(list(dataset.classes), getattr(dataset, "source", "the training set"))
        self.seen_labels, self.unseen_labels = seen, unseen
        self.query_size = query_size
        self.seed = int(seed)
        self.epoch = 0
        self.bank = ExemplarBank(dataset, seen, min_exemplar_size)
        self.indices: list[int] = []  # dataset items used
        self.choices: list[list[int]] = []  # the seen labels each can be queried with
        self.skipped: Counter[str] = Counter()
        for i in range(len(dataset)):
            present = _present_labels(dataset.raw_target(i))
            usable = [c for c in sorted(present & set(seen)) if self.bank.candidates(c, i).size]
            if exclude_unseen_images and present & set(unseen):
                self.skipped["shows an unseen class"] += 1
            elif not present & set(seen):
                self.skipped["only unseen classes" if present & set(unseen) else "no seen-class object"] += 1
            elif not usable:
                self.skipped["no exemplar of its seen classes in another image"] += 1
            else:
                self.indices.append(i)
                self.choices.append(usable)
        if self.skipped:
            logger.info("one-shot training: %d of %d images used; skipped %s", len(self.indices), len(dataset),
                        dict(self.skipped))  # fmt: skip
        if not self.indices:
            raise DataError(f"one-shot training: no usable image among {len(dataset)} ({dict(self.skipped)})")

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def draw(self, item: int) -> tuple[int, int, int]:
        """(dataset index, query label, exemplar position) of training pair ``item`` this epoch."""
        index = self.indices[item]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        label = self.choices[item][int(rng.integers(len(self.choices[item])))]
        candidates = self.bank.candidates(label, index)
        position = int(candidates[int(rng.integers(len(candidates)))])
        return index, label, position

    def pair_target(self, target: Target, label: int, position: int) -> Target:
        """``target`` (the image's, transformed) reduced to ``label``'s boxes, labelled 0 = matches the query."""
        target = _keep_label(target, label)
        target["query_label"] = torch.tensor(label)
        target["query_image_id"] = torch.tensor(self.dataset.image_ids[int(self.bank.image_index[label][position])])
        return target

    def __getitem__(self, item: int) -> tuple[Tensor, Target, Tensor]:
        index, label, position = self.draw(item)
        patch = self.bank.patch(label, position, self.query_size)
        pixels, target = self.dataset[index]
        return pixels, self.pair_target(target, label, position), patch


# ----------------------------------------------------------------------------- evaluation


class OneShotEpisodes(Dataset):
    """Every (test image, class present in it) pair with its ``num_draws`` query patches.

    Args:
        dataset: the test set, with its eval transforms attached.
        labels: class labels to evaluate (e.g. seen + unseen).
        query_size, min_exemplar_size: as :class:`OneShotTrainDataset`.
        num_draws: query patches per episode (the protocol: 5).
        exemplars: where query patches come from (default: ``dataset`` itself, the
            target image excluded); must share ``dataset.classes``.

    ``episodes[e] = (item index, label)``; ``draws[e]``: ``num_draws`` exemplar positions.
    ``dataset[e]`` is ``(pixels (3, H, W), target, patches (num_draws, 3, q, q))`` with the
    class's boxes as targets (label 0) and ``episode``, ``query_label``.
    ``missing_labels``: evaluated labels without any non-crowd box in ``dataset``;
    ``skipped``: (image, class) pairs without an exemplar from another image, per label.
    """

    def __init__(
        self,
        dataset: CocoStyleDataset,
        labels: Sequence[int],
        *,
        query_size: int,
        min_exemplar_size: int,
        num_draws: int = 5,
        exemplars: CocoStyleDataset | None = None,
    ) -> None:
        if num_draws <= 0:
            raise ValueError(f"num_draws={num_draws} must be positive")
        if exemplars is not None and list(exemplars.classes) != list(dataset.classes):
            raise DataError("the exemplar dataset and the test dataset have different classes")
        self.dataset = dataset
        self.labels = list(labels)
        self.query_size = query_size
        self.num_draws = num_draws
        same = exemplars is None
        self.bank = ExemplarBank(dataset if same else exemplars, self.labels, min_exemplar_size)
        self.episodes: list[tuple[int, int]] = []
        self.draws: list[list[int]] = []
        self.skipped: Counter[int] = Counter()
        present_anywhere: set[int] = set()
        for i in range(len(dataset)):
            present = _present_labels(dataset.raw_target(i)) & set(self.labels)
            present_anywhere |= present
            for label in sorted(present):
                candidates = self.bank.candidates(label, i if same else None)
                if not candidates.size:
                    self.skipped[label] += 1
                    continue
                order = np.random.default_rng(int(dataset.image_ids[i])).permutation(len(candidates))
                self.episodes.append((i, label))
                self.draws.append([int(candidates[order[k % len(order)]]) for k in range(num_draws)])
        self.missing_labels = [c for c in self.labels if c not in present_anywhere]
        names = dataset.classes
        if self.missing_labels:
            logger.warning("one-shot evaluation: no test instance of %s; their AP is undefined",
                           ", ".join(names[c] for c in self.missing_labels))  # fmt: skip
        if self.skipped:
            logger.warning("one-shot evaluation: skipped (image, class) pairs without an exemplar in another image: %s",
                           {names[c]: n for c, n in self.skipped.items()})  # fmt: skip

    def __len__(self) -> int:
        return len(self.episodes)

    def ground_truth(self, episode: int) -> tuple[Tensor, Tensor]:
        """Boxes of the episode's class in its image: (xyxy pixels (N, 4), ignore (N,) bool = crowd)."""
        index, label = self.episodes[episode]
        target = self.dataset.raw_target(index)
        keep = target["labels"] == label
        return target["boxes_xyxy"][keep], target["iscrowd"][keep].bool()

    def patches(self, episode: int) -> Tensor:
        """The episode's ``num_draws`` query patches, (K, 3, q, q)."""
        label = self.episodes[episode][1]
        return torch.stack([self.bank.patch(label, p, self.query_size, cache=True) for p in self.draws[episode]])

    def episode_target(self, target: Target, episode: int) -> Target:
        """``target`` (the episode image's, transformed) reduced to the episode's class, labelled 0."""
        label = self.episodes[episode][1]
        target = _keep_label(target, label)
        target["episode"] = torch.tensor(episode)
        target["query_label"] = torch.tensor(label)
        return target

    def __getitem__(self, episode: int) -> tuple[Tensor, Target, Tensor]:
        pixels, target = self.dataset[self.episodes[episode][0]]
        return pixels, self.episode_target(target, episode), self.patches(episode)  # patches: (K, 3, q, q)


class CachedOneShot(Dataset):
    """One-shot training pairs or evaluation episodes on cached CNN features of their images.

    ``source`` is an :class:`OneShotTrainDataset` or :class:`OneShotEpisodes` whose dataset has the
    eval transform; ``features`` a :class:`~updetr.data.feature_cache.CachedDetection` of that same
    dataset (with mirror images for training). Items are ``(features (Cb, h, w), target, patch)``:
    the same pairs, exemplars and targets as ``source`` gives, with the image's features in place of
    its pixels (mirrored, boxes too, as ``features`` decides per epoch). Query patches are cut from
    the exemplar images' pixels as always.
    """

    in_memory = True

    def __init__(self, source: "OneShotTrainDataset | OneShotEpisodes", features: Any) -> None:
        if len(features) != len(source.dataset):
            raise ValueError(f"cached features for {len(features)} images, the one-shot dataset has {len(source.dataset)}")
        self.source = source
        self.features = features

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.features.set_epoch(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __getitem__(self, item: int) -> tuple[Tensor, Target, Tensor]:
        source = self.source
        if isinstance(source, OneShotEpisodes):
            features, target = self.features[source.episodes[item][0]]
            return features, source.episode_target(target, item), source.patches(item)
        index, label, position = source.draw(item)
        features, target = self.features[index]
        patch = source.bank.patch(label, position, source.query_size, cache=True)
        return features, source.pair_target(target, label, position), patch


def _keep_label(target: Target, label: int) -> Target:
    """A copy of ``target`` with only ``label``'s objects, relabelled 0 (matches the query)."""
    target = dict(target)
    keep = target["labels"] == label
    for key in ("boxes_cxcywh", "labels", "area", "iscrowd"):
        if key in target:
            target[key] = target[key][keep]
    target["labels"] = torch.zeros_like(target["labels"])
    return target


def collate_one_shot(batch: Sequence[tuple[Tensor, Target, Tensor]]) -> tuple[ImageBatch, list[Target], Tensor]:
    """Padded images (``padding_mask`` True on padding), targets, and stacked patches:
    (B, 3, q, q) for training pairs, (B, K, 3, q, q) for evaluation episodes."""
    return collate_with_patches(batch)
