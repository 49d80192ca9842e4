"""The image files of a folder tree, listed once and cached (the unlabelled images of pre-training).

:func:`scan_images` walks the tree (``updetr.data.io.walk_tree``) and keeps the sorted list in a
cache file outside the tree, valid while no folder of it changed: restarting on ImageNet does
not walk 1.28M files again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

from updetr.data.io import IMAGE_EXTENSIONS, DataError, cache_folder, walk_tree

__all__ = ["image_list_cache", "scan_images", "scan_relative"]

logger = logging.getLogger(__name__)

_CACHE_HEADER = "# updetr image list v2"
_RACY_NS = 2_000_000_000  # a folder changed this close to the scan may change again unseen (coarse mtimes)


def scan_images(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, refresh: bool = False) -> list[str]:
    """Every image file under ``root`` (recursive, symlinks followed, loops skipped), sorted.

    Image files are those with an extension of ``updetr.data.io.IMAGE_EXTENSIONS``
    (case-insensitive); the walk is ``updetr.data.io.walk_tree``. The list is cached so that
    restarting on ImageNet does not walk 1.28M files again, in ``cache_dir`` or else
    ``updetr.data.io.cache_folder()/image-lists`` (never in ``root``), one file per root. The
    cache stores the modification time of every folder it walked and is used only while all
    of them are unchanged: adding, removing or renaming a file or folder anywhere in the tree
    (or re-pointing a link) makes the next call walk it again. Checking costs one ``stat`` per
    folder. ``refresh=True`` walks the tree regardless.

    Returns:
        Absolute paths.

    Raises:
        DataError: ``root`` is not a folder or holds no image file.
    """
    root_abs = os.path.abspath(os.fspath(root))
    return [os.path.join(root_abs, p) for p in scan_relative(root_abs, cache_dir, refresh)]


def image_list_cache(root_abs: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file of :func:`scan_images` for the folder ``root_abs``."""
    key = hashlib.sha1(root_abs.encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else cache_folder() / "image-lists"
    return folder / f"images-{key}.txt"


def scan_relative(root_abs: str, cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> list[str]:
    """:func:`scan_images`, paths relative to the absolute folder ``root_abs`` (a dataset of 1.28M
    images keeps these short strings, not the absolute paths)."""
    if not os.path.isdir(root_abs):
        raise DataError(f"{root_abs}: image folder not found")
    cache = image_list_cache(root_abs, cache_dir)
    if not refresh:
        relative = _read_cache(cache, root_abs)
        if relative is not None:
            return relative
    scanned_ns = time.time_ns()
    folders, relative = _walk_images(root_abs)
    if not relative:
        raise DataError(f"{root_abs}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder tree")
    try:
        _write_cache(cache, root_abs, scanned_ns, folders, relative)
    except OSError as err:
        logger.info("cannot write the image list cache %s (%s); the folder will be walked again next time", cache, err)
    return relative


def _walk_images(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(every folder walked with its mtime in ns, sorted image paths), relative to ``root``."""
    folders, found = [], []
    for relative_dir, mtime_ns, filenames in walk_tree(root):
        folders.append((relative_dir, mtime_ns))
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and "\n" not in name:  # one path a line
                found.append(os.path.normpath(os.path.join(relative_dir, name)))
    return folders, sorted(found)


def _read_cache(cache: Path, root_abs: str) -> list[str] | None:
    """The cached list, or None when there is none, it is for another root, or the tree changed."""
    try:
        lines = cache.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if len(lines) < 3 or lines[0] != _CACHE_HEADER or lines[1] != f"root {root_abs}" or not lines[2].startswith("scanned "):
        return None
    try:
        scanned_ns = int(lines[2].removeprefix("scanned "))
        relative = []
        for line in lines[3:]:
            kind, _, rest = line.partition(" ")
            if kind == "d":
                mtime, _, folder = rest.partition(" ")
                if int(mtime) >= scanned_ns - _RACY_NS or os.stat(os.path.join(root_abs, folder)).st_mtime_ns != int(mtime):
                    return None  # changed since (or too close to) the scan
            elif kind == "f":
                relative.append(rest)
            else:
                return None
    except (ValueError, OSError):
        return None
    return relative or None


def _write_cache(cache: Path, root_abs: str, scanned_ns: int, folders: list[tuple[str, int]], relative: list[str]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=cache.name, suffix=".tmp", dir=cache.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{_CACHE_HEADER}\nroot {root_abs}\nscanned {scanned_ns}\n")
            f.writelines(f"d {mtime} {folder}\n" for folder, mtime in folders)
            f.writelines(f"f {path}\n" for path in relative)
        os.replace(tmp, cache)  # atomic: readers see the old list or the whole new one
    except BaseException:
        os.unlink(tmp)
        raise
