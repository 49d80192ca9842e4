"""Frozen-CNN features computed once per image (``data.cache_features``).

When the CNN is frozen (UP-DETR pre-training as the paper does it; fine-tuning with
``optim.lr_backbone=0``), its output for a given image never changes, yet a training run
recomputes it every epoch: for the ``embedded`` recipe that forward pass is about three
quarters of a CPU training step. With ``data.cache_features=true`` every image goes
through the CNN once, at the eval size (``data.val_size``, longest side ``<= data.max_size``),
and training reads the stored maps:

- detection: the feature maps of each image and of its mirror image; a training sample
  takes the mirrored one (and mirrored boxes) with probability ``data.hflip``. DETR's
  multi-scale resize and random crop are not applied (they would need a CNN pass per
  sample).
- pre-training: the feature map of each image; the M query patches are still cropped,
  augmented and encoded afresh for every sample, exactly as without the cache.

The model is the same either way: checkpoints, evaluation and prediction on pixels are
unchanged. Flips are drawn from ``(seed, epoch, index)``, so runs and resumes are exact.

With ``data.feature_cache_dir`` set, computed maps are also stored on disk (:class:`FeatureStore`) and reused
by every later run that feeds the same pixels to the same CNN weights: both arms of ``updetr demo`` and every
run of ``updetr experiment`` encode each image once. Entries are keyed by a hash of the CNN's weights and
of the exact input pixels, so a changed image, size, transform or CNN never reads a stale map.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from updetr.config import FEATURE_ENGINES
from updetr.structures import FeatureBatch, Target

__all__ = [
    "FeatureStore", "CachedDetection", "CachedPretrainImages", "cache_train_val", "collate_features", "collate_features_with_patches",
    "pretrain_feature_table",
]


_PAD = 64  # images are padded to a multiple of this and run in batches of one padded shape
_BATCH = 16


class FeatureStore:
    """Feature maps of a frozen CNN on disk: ``root/<weights hash>/<pixels hash>.pt``, shared between runs.

    The weights hash covers the CNN's architecture name, its returned stride and every tensor of its state;
    the pixels hash covers the exact (3, H, W) float input. Files are written to a temporary name and renamed,
    so a run killed while writing never leaves a partial entry, and runs reading the store concurrently are safe.
    """

    def __init__(self, root: str | os.PathLike[str], backbone: torch.nn.Module, engine: str = ""):
        # the engine ("" for PyTorch) is part of the key: maps of two engines agree to ~3e-5, not bit for bit
        digest = hashlib.sha256(f"{backbone.name}/{backbone.strides}{'/' + engine if engine else ''}".encode())
        for key, value in sorted(backbone.body.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        self.folder = Path(root) / digest.hexdigest()[:20]
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def pixels_key(pixels: Tensor) -> str:
        data = pixels.detach().cpu().contiguous()
        digest = hashlib.sha256(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
        return digest.hexdigest()[:32]

    def load(self, key: str) -> Tensor | None:
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable entry is recomputed (and rewritten)
            return None

    def save(self, key: str, feature: Tensor) -> None:
        path = self.folder / f"{key}.pt"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(feature.clone(), tmp)
        os.replace(tmp, path)


class _LastMap(torch.nn.Module):
    """The CNN body's last (deepest) map only, as one tensor: what the cache stores, in a form ONNX exports."""

    def __init__(self, body: torch.nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return list(self.body(x).values())[-1]


class _OnnxRuntimeBody:
    """The frozen CNN body exported to ONNX in memory and run by ONNX Runtime on this process's torch thread count.

    On CPU it computes the maps 1.4-1.7x as fast as PyTorch on one thread (EfficientNet-Lite0 on the demo's images,
    ``benchmarks/feature_engine.py``); they agree with PyTorch's to about 3e-5.
    """

    def __init__(self, body: torch.nn.Module):
        import onnxruntime  # optional: the CPU engine of data.feature_engine

        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's notices about its successor
            torch.onnx.export(_LastMap(body).eval(), (torch.zeros(1, 3, 2 * _PAD, 2 * _PAD),), buffer, dynamo=False,
                              opset_version=17, input_names=["pixels"], output_names=["features"],
                              dynamic_axes={"pixels": {0: "batch", 2: "height", 3: "width"}})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: Tensor) -> Tensor:
        pixels = x.detach().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"pixels": pixels})[0])


def _choose_engine(engine: str, device: torch.device) -> str:
    if engine not in FEATURE_ENGINES:
        raise ValueError(f"data.feature_engine must be one of {', '.join(FEATURE_ENGINES)}, got {engine!r}")
    installed = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))  # export, run
    if engine == "auto":
        return "onnxruntime" if device.type == "cpu" and installed else "torch"
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"data.feature_engine=onnxruntime runs on the CPU; this run's device is {device}")
        if not installed:
            raise ValueError("data.feature_engine=onnxruntime needs ONNX and ONNX Runtime: pip install onnx onnxruntime")
    return engine


class _Encoder:
    """Runs the frozen CNN on images in batches of equal padded size (few distinct shapes, so the
    CPU convolution kernels built for a shape are reused) and returns each image's own part of
    the feature map: the cells ``ceil(h / stride) x ceil(w / stride)``, as a padded batch gives.
    With a ``store_dir``, maps already on disk (:class:`FeatureStore`) are read instead of computed.
    ``engine`` (``data.feature_engine``): ``torch``, ``onnxruntime`` (CPU), or ``auto`` (ONNX Runtime on the CPU
    when it is installed); the store keeps the maps of each engine apart."""

    def __init__(self, model: torch.nn.Module, device: torch.device, store_dir: str = "", engine: str = "torch"):
        backbone = model.backbone[0]
        if backbone.trainable:
            raise ValueError("data.cache_features needs a frozen CNN (optim.lr_backbone=0, or "
                             "pretrain.freeze_backbone=true); this model trains its backbone")
        if len(backbone.strides) != 1:
            raise ValueError("data.cache_features: the model uses the CNN's intermediate layers, which are not cached")
        self.body, self.stride, self.device = backbone.body, backbone.strides[0], device
        self.engine = _choose_engine(engine, device)
        self._onnx: _OnnxRuntimeBody | None = None
        tag = "" if self.engine == "torch" else "onnxruntime"
        self.store = FeatureStore(store_dir, backbone, tag) if store_dir else None
        self._buckets: dict[tuple[int, int], list[tuple[Any, Tensor]]] = {}
        self._store_keys: dict[Any, str] = {}
        self.done: dict[Any, Tensor] = {}

    def add(self, key: Any, pixels: Tensor) -> None:
        """Queue (3, H, W) normalised pixels under ``key``; results land in ``done[key]``."""
        if self.store is not None:
            store_key = FeatureStore.pixels_key(pixels)
            stored = self.store.load(store_key)
            if stored is not None:
                self.done[key] = stored
                return
            self._store_keys[key] = store_key
        h, w = pixels.shape[-2:]
        shape = (-(-h // _PAD) * _PAD, -(-w // _PAD) * _PAD)
        bucket = self._buckets.setdefault(shape, [])
        bucket.append((key, pixels))
        if len(bucket) >= _BATCH:
            self._run(shape)

    def flush(self) -> dict[Any, Tensor]:
        for shape in list(self._buckets):
            self._run(shape)
        return self.done

    @torch.no_grad()
    def _run(self, shape: tuple[int, int]) -> None:
        items = self._buckets.pop(shape)
        batch = torch.zeros(len(items), 3, *shape)
        for i, (_, pixels) in enumerate(items):
            batch[i, :, : pixels.shape[-2], : pixels.shape[-1]] = pixels
        if self.engine == "onnxruntime":
            if self._onnx is None:
                self._onnx = _OnnxRuntimeBody(self.body)
            features = self._onnx(batch)  # (N, Cb, H/s, W/s)
        else:
            x = batch.to(self.device).contiguous(memory_format=torch.channels_last)
            features = list(self.body(x).values())[-1].float().cpu()  # (N, Cb, H/s, W/s)
        for (key, pixels), feature in zip(items, features):
            h, w = -(-pixels.shape[-2] // self.stride), -(-pixels.shape[-1] // self.stride)
            self.done[key] = feature[:, :h, :w].contiguous()
            if self.store is not None:
                self.store.save(self._store_keys.pop(key), self.done[key])


class CachedDetection(Dataset):
    """``(features (Cb, h, w), target)`` of a labelled dataset, the CNN run once per image.

    Args:
        dataset: a detection dataset with the **eval** transform (deterministic pixels).
        model: the DETR whose frozen CNN encodes the images.
        hflip: probability that a sample is the mirror image (0 for evaluation).
        seed: with the epoch (:meth:`set_epoch`) and the index, decides each flip.
        store_dir: ``data.feature_cache_dir``; "" computes every map in this run.
        engine: ``data.feature_engine``, what runs the CNN (``torch``, ``onnxruntime`` or ``auto``).
    """

    in_memory = True  # nothing to decode: DataLoader workers would only copy tensors around

    def __init__(self, dataset: Any, model: torch.nn.Module, device: torch.device, *, hflip: float = 0.0,
                 seed: int = 0, num_workers: int = 0, progress: bool = True, desc: str = "caching CNN features",
                 store_dir: str = "", engine: str = "torch"):
        encoder = _Encoder(model, device, store_dir, engine)
        self.dataset = dataset
        self.hflip = float(hflip)
        self.seed = int(seed)
        self.epoch = 0
        self._targets: list[Target] = []
        loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
        for index, (pixels, target) in enumerate(tqdm(loader, desc=desc, total=len(dataset), disable=not progress,
                                                      leave=False, dynamic_ncols=True)):
            encoder.add((index, 0), pixels)
            if self.hflip > 0:
                encoder.add((index, 1), pixels.flip(-1))
            # own copies: a tensor from a loader worker keeps a shared-memory file open for as long as it lives,
            # and thousands of kept targets would exhaust the process's open-file limit
            self._targets.append({k: v.clone() if isinstance(v, Tensor) else v for k, v in target.items()})
        done = encoder.flush()
        views = 2 if self.hflip > 0 else 1
        # per image: the feature map of the image, then of its mirror image
        self._features = [[done[(i, v)] for v in range(views)] for i in range(len(self._targets))]

    # what evaluation and the detection task read from a dataset
    @property
    def coco(self) -> Any:
        return self.dataset.coco

    @property
    def classes(self) -> Sequence[str]:
        return self.dataset.classes

    @property
    def category_ids(self) -> Sequence[int]:
        return self.dataset.category_ids

    def __len__(self) -> int:
        return len(self._targets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def flipped(self, index: int) -> bool:
        if self.hflip <= 0:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, int(index)]).random() < self.hflip)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        target = dict(self._targets[index])
        if self.flipped(index):
            boxes = target["boxes_cxcywh"].clone()  # (N, 4) normalised
            boxes[:, 0] = 1.0 - boxes[:, 0]
            target["boxes_cxcywh"] = boxes
            return self._features[index][1], target  # type: ignore[return-value]
        return self._features[index][0], target  # type: ignore[return-value]


def cache_train_val(train: Any, val: Any | None, model: torch.nn.Module, device: torch.device, *, hflip: float,
                    seed: int, num_workers: int = 0, progress: bool = True, store_dir: str = "",
                    engine: str = "torch") -> tuple[CachedDetection, CachedDetection | None]:
    """A task's training set (each image and, with ``hflip`` > 0, its mirror) and validation set (if any), both
    with the eval transform, as :class:`CachedDetection` (``store_dir``: ``data.feature_cache_dir``; ``engine``:
    ``data.feature_engine``)."""
    cached_train = CachedDetection(train, model, device, hflip=hflip, seed=seed, num_workers=num_workers,
                                   progress=progress, desc="caching CNN features (train)", store_dir=store_dir,
                                   engine=engine)
    cached_val = None if val is None else CachedDetection(val, model, device, num_workers=num_workers,
                                                          progress=progress, desc="caching CNN features (val)",
                                                          store_dir=store_dir, engine=engine)
    return cached_train, cached_val


def pretrain_feature_table(dataset: Any, model: torch.nn.Module, device: torch.device, size: int, *,
                           progress: bool = True, store_dir: str = "",
                           engine: str = "torch") -> dict[int, tuple[Tensor, Tensor]]:
    """file index -> (features (Cb, h, w), image size (2,) int64) of every usable image of an
    :class:`~updetr.data.unlabeled.UnlabeledImages`, resized to shortest side ``size``
    (``store_dir``: ``data.feature_cache_dir``; ``engine``: ``data.feature_engine``)."""
    encoder = _Encoder(model, device, store_dir, engine)
    sizes: dict[int, Tensor] = {}
    for index in tqdm(range(len(dataset)), desc="caching CNN features", disable=not progress, leave=False,
                      dynamic_ncols=True):
        file_index, image = dataset.fixed_size_image(index, size)
        if file_index not in sizes:  # an unusable file maps to the next usable one, already queued
            sizes[file_index] = torch.tensor(image.shape[-2:], dtype=torch.int64)
            encoder.add(file_index, image)
    done = encoder.flush()
    return {i: (done[i], sizes[i]) for i in sizes}


class CachedPretrainImages(Dataset):
    """``(features, target, patches)``: UP-DETR pre-training samples on cached image features.

    ``dataset`` (an :class:`~updetr.data.unlabeled.UnlabeledImages`) draws the query patches
    and their boxes as always; the image's features come from ``table``
    (:func:`pretrain_feature_table`). Boxes are normalised, so they hold for the cached size.
    """

    def __init__(self, dataset: Any, table: dict[int, tuple[Tensor, Tensor]]):
        self.dataset = dataset
        self.table = table

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[Tensor, Target, Tensor]:
        _, target, patches = self.dataset.sample(index, with_image=False)
        features, size = self.table[int(target["image_id"])]
        target["size"] = size.clone()
        return features, target, patches


def collate_features(batch: Sequence[tuple[Tensor, Target]]) -> tuple[FeatureBatch, list[Target]]:
    """Pad cached feature maps into a :class:`FeatureBatch` (``padding_mask`` True on padding)."""
    return FeatureBatch.from_tensors([item[0] for item in batch]), [item[1] for item in batch]


def collate_features_with_patches(
    batch: Sequence[tuple[Tensor, Target, Tensor]],
) -> tuple[FeatureBatch, list[Target], Tensor]:
    """As :func:`collate_features`, plus the query patches stacked (B, M, 3, q, q)."""
    features, targets, patches = zip(*batch)
    return FeatureBatch.from_tensors(list(features)), list(targets), torch.stack(patches)
