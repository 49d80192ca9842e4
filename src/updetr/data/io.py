"""Image files and folders, with clear errors.

Every dataset of this package reads images through :func:`load_image`, which always
returns an 8-bit RGB ``PIL.Image.Image`` (EXIF orientation applied) or raises
:class:`DataError` with a message naming the file and the problem. The other readers share
this module's rules too:

- **pixel limit**: an image with more pixels than :func:`pixel_limit` (Pillow's
  ``Image.MAX_IMAGE_PIXELS``, about 89 M) is refused from its header, before any decoder
  allocates its pixels (:func:`check_pixel_limit`; libjpeg-turbo's path calls it too);
- **folders**: :func:`walk_tree` follows symbolic links but enters every real folder once, so
  a link loop (``ln -s . self``) or a second link to a folder is walked once, not forever;
- **annotation paths**: :func:`path_inside` keeps a ``file_name`` of an annotation file inside
  its image folder (no absolute paths, no ``..`` above it) unless ``UPDETR_IMAGES_OUTSIDE_ROOT=1``;
- **start-up check**: :func:`find_unusable_images` decodes a list of files in threads and
  reports every one that cannot be used, not only the first;
- **caches** that can be rebuilt live in :func:`cache_folder`, never in the user's data folders.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DataError", "IMAGE_EXTENSIONS", "load_image", "load_annotated_image", "is_image_file", "pixel_limit",
    "check_pixel_limit", "image_size_from_bytes", "image_problem", "walk_tree", "path_inside", "find_unusable_images",
    "cache_folder", "open_image", "parse_box", "parse_image_box",
]

logger = logging.getLogger(__name__)

#: Set to 1 to let annotation files name images outside their image folder.
OUTSIDE_ROOT_ENV = "UPDETR_IMAGES_OUTSIDE_ROOT"
#: Overrides where rebuildable caches are kept (:func:`cache_folder`).
CACHE_ENV = "UPDETR_CACHE_DIR"

#: File extensions (lower case, with the dot) treated as images when scanning folders.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
)

# the text after an image path's last colon that makes it IMG:x,y,w,h (numbers and commas only)
_BOX_TEXT = re.compile(r"^\s*[-+0-9.eE]+(\s*,\s*[-+0-9.eE]+)+\s*$")

# Background that transparent pixels are composited onto (white, as an image viewer shows
# them); opaque pixels are unchanged.
_BACKGROUND_RGB = (255, 255, 255)


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent; the message names the file."""


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike, *, exif_transpose: bool = True) -> Image.Image:
    """Read an image file as 8-bit RGB.

    The whole file is decoded here, so a truncated file fails now and not in a worker later.

    Conversions: ``L``/``1`` are replicated to three channels; images with transparency
    (``LA``, ``RGBA``, ``PA``, ``P`` with a transparent colour) are alpha-composited over
    white; ``P`` uses its palette; ``CMYK``/``YCbCr`` are converted by Pillow; 16-bit
    ``I;16*`` and 32-bit ``I`` images are scaled from ``[0, 65535]`` to ``[0, 255]`` (not
    clipped); ``F`` images are clipped to ``[0, 255]``.

    Args:
        path: image file.
        exif_transpose: apply the EXIF orientation tag (rotate/flip the pixels so the image
            looks as a viewer shows it).

    Returns:
        A loaded ``PIL.Image.Image`` of mode ``RGB`` with no link to the open file.

    Raises:
        DataError: the file is missing, not an image, truncated or otherwise unreadable.
    """
    path = Path(path)
    _check_is_file(path)
    try:
        with open_image(path) as image:
            image.load()  # full decode: detects truncated files
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except DataError:
        raise
    except Exception as err:  # Pillow raises many types for broken files
        raise _decode_error(path, err) from None


def pixel_limit() -> int | None:
    """The most pixels an image may have before it is decoded: Pillow's ``Image.MAX_IMAGE_PIXELS``
    (read at each call, so raising it there raises it here; ``None`` turns the limit off)."""
    return Image.MAX_IMAGE_PIXELS


def check_pixel_limit(path: str | os.PathLike, width: int, height: int) -> None:
    """Raise DataError when a ``width`` x ``height`` image exceeds :func:`pixel_limit`
    (a decompression bomb: a small file that would decode to gigabytes)."""
    limit = pixel_limit()
    if limit is not None and width * height > limit:
        raise DataError(
            f"{path}: image of {width}x{height} pixels is larger than the limit of {limit} pixels; not decoded "
            "(raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
        )


def image_size_from_bytes(path: str | os.PathLike, data: bytes) -> tuple[int, int]:
    """(width, height) from an encoded image's header, checked against :func:`pixel_limit`;
    nothing is decoded. DataError naming ``path`` when the header cannot be read."""
    try:
        with open_image(io.BytesIO(data), name=path) as image:
            return image.size
    except DataError:
        raise
    except Exception as err:
        raise _decode_error(Path(path), err) from None


class open_image:  # noqa: N801 - used as a function: `with open_image(path) as image`
    """``Image.open`` (header only) with the pixel limit enforced before anything is decoded."""

    def __init__(self, source, name: str | os.PathLike | None = None) -> None:
        self.source, self.name = source, name if name is not None else source

    def __enter__(self) -> Image.Image:
        with warnings.catch_warnings():  # the limit below decides; Pillow's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                self.image = Image.open(self.source)
            except Image.DecompressionBombError as err:  # Pillow's own check, at twice the limit
                found = re.search(r"\((\d+) pixels\)", str(err))
                size = f"of {found.group(1)} pixels " if found else ""
                raise DataError(f"{self.name}: image {size}is larger than the limit of {pixel_limit()} pixels; not "
                                "decoded (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)") from None
        try:
            check_pixel_limit(self.name, *self.image.size)
        except DataError:
            self.image.close()
            raise
        return self.image

    def __exit__(self, *exc) -> None:
        self.image.close()


def _check_is_file(path: Path) -> None:
    if not path.is_file():
        problem = "is a directory, not an image file" if path.is_dir() else "image file not found"
        raise DataError(f"{path}: {problem}")


def _decode_error(path: Path, err: BaseException) -> DataError:
    if isinstance(err, UnidentifiedImageError):
        return DataError(f"{path}: not an image file (format not recognised)")
    text = str(err)
    problem = "image file is truncated or corrupt" if "truncat" in text.lower() else "cannot decode image"
    return DataError(f"{path}: {problem} ({text})")


def load_annotated_image(path: str | os.PathLike, expected_hw: tuple[int, int]) -> Image.Image:
    """Load an image whose annotations were made on a ``(height, width)`` pixel grid.

    Annotation files (COCO JSON, VOC XML) store the size the boxes refer to. COCO's
    annotations refer to the stored pixels, ignoring EXIF orientation; some tools annotate
    the EXIF-rotated view. The raw pixels are used when they match ``expected_hw``, the
    EXIF-transposed view when only that matches.

    Raises:
        DataError: neither view has the expected size, or the file cannot be read.
    """
    image = load_image(path, exif_transpose=False)
    if (image.height, image.width) == tuple(expected_hw):
        return image
    rotated = load_image(path, exif_transpose=True)
    if (rotated.height, rotated.width) == tuple(expected_hw):
        return rotated
    raise DataError(
        f"{path}: image is {image.height}x{image.width} (height x width) but its annotation "
        f"says {expected_hw[0]}x{expected_hw[1]}"
    )


def _exif_swaps_sides(image: Image.Image) -> bool:
    """Whether the EXIF orientation tag turns the image by 90 degrees (tags 5-8)."""
    try:
        return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # a broken EXIF block: exif_transpose would not turn it either
        return False


def image_problem(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> str | None:
    """Why the image at ``path`` cannot be used (the DataError message), or None when it can.

    The file is decoded in full (a truncated file fails here, not in a DataLoader worker an
    epoch later); with ``expected_hw`` its size must match the annotation, raw or EXIF-rotated
    (as :func:`load_annotated_image` accepts it).
    """
    path = Path(path)
    try:
        _check_is_file(path)
        with open_image(path) as image:
            image.load()
            width, height = image.size
            swapped = _exif_swaps_sides(image)
    except DataError as err:
        return str(err)
    except Exception as err:
        return str(_decode_error(path, err))
    if expected_hw is not None and tuple(expected_hw) not in ((height, width), (width, height) if swapped else (height, width)):
        return (f"{path}: image is {height}x{width} (height x width) but its annotation says "
                f"{expected_hw[0]}x{expected_hw[1]}")
    return None


def find_unusable_images(
    items: Sequence[tuple[str | os.PathLike, tuple[int, int] | None]], *, workers: int | None = None,
) -> list[str]:
    """Decode every ``(path, expected (h, w) or None)`` of ``items`` and return one message per file
    that cannot be used (:func:`image_problem`), in the order of ``items``.

    Runs in ``workers`` threads (default: up to 8, one per CPU); Pillow decodes without
    holding the GIL.
    """
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if workers == 1 or len(items) < 2:
        problems = [image_problem(p, hw) for p, hw in items]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(lambda item: image_problem(*item), items, chunksize=16))
    return [p for p in problems if p is not None]


def walk_tree(root: str | os.PathLike) -> Iterator[tuple[str, int, list[str]]]:
    """Every folder of the tree under ``root``, once: ``(folder relative to root, its mtime in ns,
    sorted names of the files in it)``, in a deterministic order.

    Symbolic links to folders are followed, but a folder already walked (same device and
    inode) is not entered again: a link loop such as ``ln -s . self`` or two links to one
    folder cost one visit, never an endless walk. A folder that cannot be listed is skipped
    with a warning naming it. ``"files"`` are the entries that are not folders (broken links
    included).
    """
    root = os.fspath(root)
    seen: set[tuple[int, int]] = set()

    def warn(err: OSError) -> None:
        logger.warning("cannot list %s (%s); skipped", err.filename, err.strerror)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=warn):
        try:
            stat = os.stat(dirpath)
        except OSError as err:
            warn(err)
            dirnames[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in seen:  # a link loop or a second link to a folder
            dirnames[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirnames.sort()  # of two links to one folder, the first in this order is the one walked
        yield os.path.normpath(os.path.relpath(dirpath, root)), stat.st_mtime_ns, sorted(filenames)


def path_inside(root: str | os.PathLike, name: str) -> Path | None:
    """``root / name`` when ``name`` stays inside ``root``, else None.

    The test is on the name (an absolute path, a drive, or ``..`` climbing above ``root``
    leave it), not on the file system: a symbolic link placed inside ``root`` is the user's
    own choice and is followed. With the environment variable ``UPDETR_IMAGES_OUTSIDE_ROOT=1``
    every name is accepted.
    """
    if os.environ.get(OUTSIDE_ROOT_ENV, "") not in ("", "0"):
        return Path(root) / name
    pure = PurePath(name)
    if pure.is_absolute() or pure.drive or pure.anchor:
        return None
    parts = os.path.normpath(name).replace("\\", "/").split("/")
    if parts[0] == "..":
        return None
    return Path(root) / name


def cache_folder() -> Path:
    """Where updetr keeps what it can rebuild (lists of image files): ``$UPDETR_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/updetr``, else ``~/.cache/updetr``. Never a data folder of the user's."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "updetr"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see :func:`load_image`)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.float64)  # (H, W), 16-bit range
        values = np.clip(values, 0, 65535) / 257.0  # 65535 -> 255
        return Image.fromarray(np.round(values).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 255)
        return Image.fromarray(np.round(values).astype(np.uint8), mode="L").convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGBA", image.size, _BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _box_problem(text: str) -> tuple[tuple[float, float, float, float] | None, str]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        return None, "must be x,y,w,h in pixels (four numbers)"
    if len(values) != 4:
        return None, f"must be 4 numbers x,y,w,h in pixels, got {len(values)}"
    return values, ""  # type: ignore[return-value]


def parse_box(text: str, what: str = "box") -> tuple[float, float, float, float]:
    """``x,y,w,h`` in pixels -> four floats; anything else is a :class:`DataError` naming ``what``."""
    box, problem = _box_problem(text)
    if box is None:
        raise DataError(f"{what} {text!r}: {problem}")
    return box


def parse_image_box(spec: str, what: str = "--exemplar") -> tuple[Path, tuple[float, float, float, float] | None]:
    """``IMG`` or ``IMG:x,y,w,h`` (pixels) -> (path, box xywh or None for the whole image).

    The box is what follows the *last* colon, and only when it reads as comma-separated numbers, so paths with
    colons of their own (``C:/photos/cat.jpg``, ``a:b.png``) stay whole.
    """
    path, sep, text = spec.rpartition(":")
    if not sep or not _BOX_TEXT.match(text):
        return Path(spec), None
    box, problem = _box_problem(text)
    if box is None:
        raise DataError(f"{what} {spec!r}: {problem}")
    return Path(path), box
