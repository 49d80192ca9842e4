"""Build the labelled detection dataset a config describes."""

from __future__ import annotations

from pathlib import Path

from updetr.config import DataConfig
from updetr.data.coco import CocoDetection, CocoStyleDataset
from updetr.data.io import DataError
from updetr.data.transforms import build_transforms
from updetr.data.voc import VOCDetection

__all__ = ["build_detection_dataset"]


def build_detection_dataset(cfg: DataConfig, split: str, *, return_masks: bool = False,
                            augment: bool | None = None) -> CocoStyleDataset:
    """The ``"train"`` or ``"val"`` dataset of ``cfg``, with its transforms attached.

    ``cfg.format == "coco"``: :class:`CocoDetection` over ``cfg.{split}_images`` and
    ``cfg.{split}_annotations``; ``"voc"``: :class:`VOCDetection` over ``cfg.root`` with
    ``cfg.voc_{split}_sets`` and ``cfg.voc_difficult``. Relative paths are resolved against
    ``cfg.root`` (the working directory when it is empty). Train uses the augmenting
    transform, val the eval resize (``updetr.data.transforms.build_transforms``);
    ``augment`` overrides that choice (``False``: the eval resize for the train split too).

    Raises:
        ValueError: unknown ``split``.
        DataError: ``cfg.root`` or a configured file/folder does not exist, or the data is
            invalid; the message names the config field and the path.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} must be 'train' or 'val'")
    train = split == "train"
    root = Path(cfg.root) if cfg.root else None
    if root is not None and not root.is_dir():
        raise DataError(f"data.root={cfg.root!r}: folder not found")
    transforms = build_transforms(cfg, train=train if augment is None else augment)

    if cfg.format == "coco":
        images = _resolve(root, cfg.train_images if train else cfg.val_images)
        annotations = _resolve(root, cfg.train_annotations if train else cfg.val_annotations)
        if not images.is_dir():
            raise DataError(f"data.{split}_images: image folder {images} not found")
        if not annotations.is_file():
            raise DataError(f"data.{split}_annotations: annotation file {annotations} not found")
        return CocoDetection(images, annotations, transforms, return_masks=return_masks)
    if cfg.format == "voc":
        if return_masks:
            raise DataError("data.format='voc': Pascal VOC detection has no instance masks")
        if root is None:
            raise DataError("data.format='voc' needs data.root, the VOCdevkit folder (or the folder holding it)")
        sets = cfg.voc_train_sets if train else cfg.voc_val_sets
        return VOCDetection(root, sets, transforms, difficult=cfg.voc_difficult)
    raise DataError(f"data.format={cfg.format!r} is not one of coco, voc")


def _resolve(root: Path | None, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or root is None else root / p
