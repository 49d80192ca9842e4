"""The bundled material of the embedded benchmark (``updetr.data.embedded``), all read offline from installed
packages: the thing classes and the pictures they are cut from (``THING_SOURCES``: scikit-image, scikit-learn and
matplotlib sample pictures), the stuff classes and their scikit-image textures, and the background photographs
that show no object class (``_BACKGROUND_PHOTOS``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThingSource:
    """Where one thing class is cut from: a bundled picture and the object's region in it.

    ``box`` is (x0, y0, x1, y1) in fractions of the picture's width and height. ``matte`` is ``ellipse``
    (an elliptic cut-out of the region), ``alpha`` (the picture's own transparency) or ``silhouette`` (the
    picture is a binary mask, filled with a tinted texture).
    """

    name: str
    picture: str  # "skimage:NAME", "sklearn:FILE" (load_sample_images) or "matplotlib:FILE" (sample data)
    box: tuple[float, float, float, float]
    matte: str = "ellipse"


THING_SOURCES: tuple[ThingSource, ...] = (
    ThingSource("cat", "skimage:chelsea", (0.17, 0.0, 0.9, 1.0)),
    ThingSource("coffee", "skimage:coffee", (0.15, 0.06, 0.82, 0.84)),
    ThingSource("astronaut", "skimage:astronaut", (0.12, 0.0, 0.8, 1.0)),
    ThingSource("rocket", "skimage:rocket", (0.38, 0.12, 0.63, 1.0)),
    ThingSource("cameraman", "skimage:camera", (0.18, 0.06, 0.76, 0.86)),
    ThingSource("colorwheel", "skimage:colorwheel", (0.0, 0.0, 1.0, 1.0)),
    ThingSource("logo", "skimage:logo", (0.0, 0.0, 1.0, 1.0)),  # round; its alpha channel is opaque everywhere
    ThingSource("retina", "skimage:retina", (0.0, 0.0, 1.0, 1.0)),
    ThingSource("pagoda", "sklearn:china.jpg", (0.28, 0.0, 0.74, 0.8)),
    ThingSource("grace_hopper", "matplotlib:grace_hopper.jpg", (0.1, 0.05, 0.9, 0.7)),
    ThingSource("flower", "sklearn:flower.jpg", (0.27, 0.12, 0.73, 0.8)),
    ThingSource("clock", "skimage:clock", (0.28, 0.2, 0.74, 0.76)),
    ThingSource("present", "matplotlib:Minduka_Present_Blue_Pack.png", (0.0, 0.0, 1.0, 1.0), "alpha"),
    ThingSource("horse", "skimage:horse", (0.0, 0.0, 1.0, 1.0), "silhouette"),
)
EMBEDDED_THING_CLASSES: tuple[str, ...] = tuple(source.name for source in THING_SOURCES)
EMBEDDED_STUFF_CLASSES: tuple[str, ...] = ("brick", "grass", "gravel", "other")  # "other" = photo background
ONESHOT_UNSEEN: tuple[str, ...] = ("flower", "clock", "present", "horse")  # 10 seen / 4 unseen

# pictures that show none of the thing classes: the "other" background behind everything
_BACKGROUND_PHOTOS = ("hubble_deep_field", "immunohistochemistry", "moon", "text", "page", "coins", "cell")
STUFF_TINTS = {"brick": (165, 85, 65), "grass": (80, 145, 60), "gravel": (140, 135, 125)}  # mean RGB
_SOURCE_SIDE = 256  # object pictures are stored with this longer side (enough for the largest drawn object)


@dataclass
class Thing:
    """One thing class's picture, cut to the object's region and stored at ``_SOURCE_SIDE``, ready to draw."""

    rgb: np.ndarray  # (h, w, 3) float32 0-255: the object's region of its picture
    alpha: np.ndarray | None  # (h, w) float32 in [0, 1] for the alpha / silhouette mattes, else None
    matte: str


@dataclass
class Assets:
    """Everything the images are drawn from, loaded once per generation (:func:`load_assets`)."""

    photos: list[Image.Image]  # RGB background photographs
    photo_names: list[str]
    textures: dict[str, Image.Image]  # mode "F", contrast-stretched to about [0, 1]
    things: list[Thing]  # one per EMBEDDED_THING_CLASSES entry


def bundled_picture(spec: str) -> np.ndarray:
    """A bundled picture as (H, W, 3 or 4) or (H, W) uint8 / bool, read offline from an installed package."""
    library, _, name = spec.partition(":")
    if library == "skimage":
        import skimage.data

        return np.asarray(getattr(skimage.data, name)())
    if library == "sklearn":
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(name))
    if library == "matplotlib":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(name) as f:
            return np.asarray(Image.open(f).convert("RGBA" if name.endswith(".png") else "RGB"))
    raise ValueError(f"unknown picture library in {spec!r}")


def _load_thing(source: ThingSource, grass: np.ndarray) -> Thing:
    picture = bundled_picture(source.picture)
    height, width = picture.shape[:2]
    x0, y0, x1, y1 = (round(f * n) for f, n in zip(source.box, (width, height, width, height)))
    region = picture[y0:y1, x0:x1]
    scale = _SOURCE_SIDE / max(region.shape[:2])
    size = (max(1, round(region.shape[1] * scale)), max(1, round(region.shape[0] * scale)))
    alpha = None
    if source.matte == "silhouette":  # a binary mask: the object is where it is False (dark), filled below
        mask = Image.fromarray((~region.astype(bool)).astype(np.float32))
        alpha = np.asarray(mask.resize(size, Image.BILINEAR), dtype=np.float32)
        fur = Image.fromarray(grass).resize(size, Image.BILINEAR)
        rgb = np.asarray(fur, dtype=np.float32)[..., None] * np.array([0.55, 0.35, 0.2], dtype=np.float32) + 20.0
        return Thing(rgb, alpha, source.matte)
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    image = Image.fromarray(np.ascontiguousarray(region)).resize(size, Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32)
    if source.matte == "alpha":
        alpha = array[..., 3] / 255.0
    return Thing(array[..., :3].copy(), alpha, source.matte)


def load_assets() -> Assets:
    """Background photographs, stuff textures and the thing pictures, all from installed packages."""
    import skimage.data

    photos, names = [], []
    for name in _BACKGROUND_PHOTOS:
        try:
            array = np.asarray(getattr(skimage.data, name)())
        except Exception as error:  # a photograph this install cannot provide offline
            logger.warning("skipping scikit-image photograph %r: %s", name, error)
            continue
        array = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array[..., :3]
        photos.append(Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)))
        names.append(name)
    if not photos:
        raise RuntimeError("no scikit-image photograph could be loaded offline")
    textures = {}
    for name in STUFF_TINTS:
        texture = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        low, high = np.percentile(texture, [2, 98])
        textures[name] = Image.fromarray((texture - low) / (high - low))
    grass = np.asarray(skimage.data.grass())
    things = [_load_thing(source, grass) for source in THING_SOURCES]
    return Assets(photos, names, textures, things)
