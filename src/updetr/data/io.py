"""Image loading with clear errors.

Every dataset of this package reads images through :func:`load_image`, which always
returns an 8-bit RGB ``PIL.Image.Image`` (EXIF orientation applied) or raises
:class:`DataError` with a message naming the file and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DataError", "IMAGE_EXTENSIONS", "load_image", "load_annotated_image", "is_image_file"]

#: File extensions (lower case, with the dot) treated as images when scanning folders.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
)

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
    if not path.is_file():
        problem = "is a directory, not an image file" if path.is_dir() else "image file not found"
        raise DataError(f"{path}: {problem}")
    try:
        with Image.open(path) as image:
            image.load()  # full decode: detects truncated files
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (format not recognised)") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: image too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        text = str(err)
        problem = "image file is truncated or corrupt" if "truncat" in text.lower() else "cannot decode image"
        raise DataError(f"{path}: {problem} ({text})") from None


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
