"""The page's pictures: the bundled photographs, the demo benchmark's images, and uploads, all in memory.

Uploads are decoded from the request's bytes; nothing of them (neither their bytes nor any name) is written to
disk, and each gets a random id. Their size in bytes and in pixels is limited before anything is decoded; the last
32 are kept, with their longer side at most 1280 pixels.
"""

from __future__ import annotations

import io
import re
import secrets
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..data.io import DataError, load_image, open_image
from ..report import photographs

MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # 8 MiB of encoded image
MAX_UPLOAD_PIXELS = 16_000_000  # 16 megapixels decoded (a 4000 x 4000 photograph); a bomb is refused from its header
PHOTO_SIDE = 512  # bundled photographs are shown with this longer side
UPLOAD_SIDE = 1280  # uploads are kept with at most this longer side (the models see 224-336 px anyway)
_ID = re.compile(r"^[a-z0-9_-]{1,64}$")


class ImageRefused(ValueError):
    """An upload that is not accepted; the message says why, ``status`` is the HTTP status to answer with
    (413 too many pixels, 415 not an image, 400 a broken image)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Picture:
    id: str
    name: str
    kind: str  # photograph | benchmark | upload
    image: Image.Image  # RGB
    jpeg: bytes  # what the page displays

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "kind": self.kind, "width": self.image.width,
                "height": self.image.height, "url": f"/api/images/{self.id}"}


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def bundled_photographs(side: int = PHOTO_SIDE) -> list[tuple[str, Image.Image]]:
    """``(name, RGB image)`` of every photograph of :data:`updetr.report.PHOTOGRAPHS`, longer side ``side``."""
    return photographs(side)


def decode_upload(data: bytes, max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """The uploaded bytes as an RGB image; ImageRefused naming the problem (not an image, too many pixels, broken)."""
    if not data:
        raise ImageRefused("upload: the file is empty", 415)
    try:
        with open_image(io.BytesIO(data), name="upload") as image:  # Pillow's own bomb limit, from the header
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRefused(f"upload: image of {width}x{height} pixels is larger than this server's limit of "
                                   f"{max_pixels} pixels; not decoded (a decompression bomb, or a photo to shrink)", 413)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                flat = Image.new("RGB", rgba.size, "white")
                flat.paste(rgba, mask=rgba.getchannel("A"))
                return flat
            return image.convert("RGB")
    except ImageRefused:
        raise
    except DataError as err:  # over Pillow's own limit: refused from the header too
        text = str(err).replace("(raise PIL.Image.MAX_IMAGE_PIXELS to allow it)", f"(this server's limit is {max_pixels} pixels)")
        raise ImageRefused(text, 413 if "larger than the limit" in text else 400) from None
    except UnidentifiedImageError:
        raise ImageRefused("upload: not an image file (format not recognised; send a JPEG, PNG, WebP, BMP or GIF)",
                           415) from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for broken files
        raise ImageRefused(f"upload: cannot decode the image ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


class PictureStore:
    """Pictures by id: the fixed ones (photographs, benchmark images) and the last ``max_uploads`` uploads."""

    def __init__(self, benchmark_images: list[Path] | None = None, max_uploads: int = 32,
                 max_pixels: int = MAX_UPLOAD_PIXELS):
        self.fixed: dict[str, Picture] = {}
        for name, image in bundled_photographs():
            self.fixed[name] = Picture(name, name, "photograph", image, _jpeg(image))
        for path in benchmark_images or []:
            image = load_image(path)
            pid = f"benchmark-{path.stem}"
            self.fixed[pid] = Picture(pid, f"benchmark {path.stem}", "benchmark", image, _jpeg(image))
        self.uploads: OrderedDict[str, Picture] = OrderedDict()
        self.max_uploads, self.max_pixels = max_uploads, max_pixels
        self.lock = threading.Lock()

    def list(self) -> list[dict]:
        return [p.to_dict() for p in self.fixed.values()]

    def get(self, pid: object) -> Picture | None:
        if not isinstance(pid, str) or not _ID.match(pid):
            return None
        with self.lock:
            return self.fixed.get(pid) or self.uploads.get(pid)

    def add_upload(self, data: bytes) -> Picture:
        image = decode_upload(data, self.max_pixels)
        if max(image.size) > UPLOAD_SIDE:  # kept smaller: 32 uploads stay within ~150 MB; boxes use the kept size
            scale = UPLOAD_SIDE / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
        pid = f"upload-{secrets.token_hex(8)}"
        picture = Picture(pid, "uploaded image", "upload", image, _jpeg(image))
        with self.lock:
            self.uploads[pid] = picture
            while len(self.uploads) > self.max_uploads:
                self.uploads.popitem(last=False)
        return picture
