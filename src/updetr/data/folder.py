"""A folder (or list) of images for prediction, without annotations."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from updetr.data.io import DataError, is_image_file, load_image, walk_tree
from updetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ImageFolder", "finish_skipped"]

logger = logging.getLogger(__name__)


class ImageFolder(Dataset):
    """Images to run a detector on.

    ``dataset[i]`` is ``(pixels, info)``: ``pixels`` float (3, H, W) normalised with
    ImageNet mean/std after ``transforms`` (use ``build_transforms(cfg, train=False)``,
    the eval resize; with ``transforms=None`` the image keeps its size), and ``info`` a dict
    with ``image_id`` (int64 scalar, the index ``i``), ``orig_size`` and ``size`` (int64 (2,),
    (h, w) on disk and after the transform) and ``path`` (str).

    Args:
        source: a folder, scanned recursively (sorted paths; symbolic links followed, each real
            folder once: see ``updetr.data.io.walk_tree``), or a list of image files.
            Files whose extension is not in ``IMAGE_EXTENSIONS`` are skipped with one
            warning that counts them.
        transforms: callable ``(PIL image, target) -> (tensor, target)``.

    Raises:
        DataError: ``source`` (or a listed file) does not exist or holds no image; an
            unreadable image raises when it is loaded, naming the file (``iter_usable`` skips
            and records such files instead).
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        transforms: Callable[[Image.Image, dict[str, Any]], tuple[Tensor, dict[str, Any]]] | None = None,
    ) -> None:
        sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        candidates: list[Path] = []
        for item in sources:
            path = Path(item)
            if path.is_dir():  # links followed, every real folder once (a link loop is not walked forever)
                candidates += sorted(path / d / f for d, _, files in walk_tree(path) for f in files)
            elif path.is_file():
                candidates.append(path)
            else:
                raise DataError(f"{path}: image folder or file not found")
        where = str(sources[0]) if len(sources) == 1 else f"{len(sources)} listed files/folders"
        self.paths: list[Path] = [p for p in candidates if is_image_file(p)]
        self.skipped_files = len(candidates) - len(self.paths)
        if self.skipped_files:
            skipped = [p.name for p in candidates if not is_image_file(p)][:3]
            logger.warning("%s: skipped %d non-image files (e.g. %s)", where, self.skipped_files, ", ".join(skipped))
        if not self.paths:
            raise DataError(f"{where}: no image files found")
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        return self._item(index, load_image(self.paths[index]))

    def _item(self, index: int, image: Image.Image) -> tuple[Tensor, dict[str, Any]]:
        path = self.paths[index]
        size = torch.tensor([image.height, image.width], dtype=torch.int64)  # (2,) (h, w)
        info: dict[str, Any] = {
            "image_id": torch.tensor(index, dtype=torch.int64),
            "orig_size": size,
            "size": size.clone(),
            "path": str(path),
        }
        if self.transforms is not None:
            return self.transforms(image, info)
        pixels = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)  # (3, H, W)
        return F.normalize(pixels, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)), info

    def iter_usable(self, skipped: list[dict[str, str]]) -> Iterator[tuple[int, Tensor, dict[str, Any], Image.Image]]:
        """``(index, pixels, info, RGB image)`` of every image that can be read, in order.

        A file that cannot be read (``DataError``: truncated, not an image, over the pixel
        limit, a broken link, ...) is appended to ``skipped`` as ``{"file", "error"}`` with a
        warning, and the iteration goes on with the next one.
        """
        for index, path in enumerate(self.paths):
            try:
                image = load_image(path)
            except DataError as err:
                skipped.append({"file": str(path), "error": str(err)})
                logger.warning("skipped an unreadable image: %s", err)
                continue
            yield (index, *self._item(index, image), image)


def finish_skipped(output_dir: str | os.PathLike, skipped: list[dict[str, str]], total: int) -> Path | None:
    """After a prediction pass over ``total`` images: write ``skipped.json`` (the unreadable files
    and why) into ``output_dir``, or remove a stale one when nothing was skipped.

    Returns:
        The ``skipped.json`` written, or None.

    Raises:
        DataError: every one of the ``total`` images was unreadable (nothing to write results for).
    """
    out = Path(output_dir)
    path = out / "skipped.json"
    if skipped and len(skipped) == total:
        raise DataError(f"none of the {total} images could be read (first: {skipped[0]['error']})")
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "skipped.json.tmp"
    tmp.write_text(json.dumps(skipped, indent=2) + "\n")
    tmp.replace(path)
    return path
