"""The embedded benchmark: an offline, deterministic detection dataset built from bundled material.

Every demo, test and experiment of the project runs on it, because nothing may be downloaded. It is written to
disk exactly as the real datasets are, so the COCO, COCO-panoptic and unlabelled-image loaders read it unchanged:

    out_dir/train/000000.jpg ...            labelled images (JPEG quality 95), likewise val/
    out_dir/unlabeled/000000.jpg ...        images generated the same way, with no annotations (pre-training)
    out_dir/annotations/instances_{train,val}.json   COCO detection: bbox xywh pixels, RLE of the visible mask
    out_dir/annotations/panoptic_{train,val}.json    COCO panoptic, with PNGs in panoptic_{train,val}/
    out_dir/oneshot_split.json              {"seen": [...], "unseen": [...]} thing-class names
    out_dir/meta.json                       generation arguments, format version, per-split counts

Content of one image (H and W each drawn from ``image_size``):
    1. Background: a random crop (random scale, horizontal flip, mild colour cast) of one of the bundled
       photographs that show no object class (``_BACKGROUND_PHOTOS``: star field, tissue, moon, text, coins ...).
    2. Stuff: 1-3 random polygons or bands filled with a tinted scikit-image texture (brick, grass, gravel).
       Whatever the photograph still shows is the stuff class ``other``, so a panoptic PNG labels every pixel
       except the void ones (below).
    3. Things: 1 to ``max_objects`` photographed objects, each cut from the bundled photographs of scikit-image,
       scikit-learn and matplotlib (``THING_SOURCES``: a cat, a cup of coffee, an astronaut, a rocket, a flower,
       ...): a random part of the object's region (85-100 % of each side), mirrored at random, resized to the
       drawn box (aspect jittered), its brightness, contrast and saturation jittered, and cut out by an
       elliptic matte (or the picture's own alpha / silhouette). These are things an ImageNet CNN knows.
       Sides are drawn log-uniformly within ``object_size`` (fractions of the image's shorter side, never below
       12 px). Later objects paste over earlier ones; an object more than 70% occluded is dropped and its
       remaining visible pixels become void (panoptic id 0), like unannotated objects in real data. An object's
       mask is its visible pixels of alpha >= 0.5, and its box is the tight box of that mask.

Category ids: things 1..14 in ``EMBEDDED_THING_CLASSES`` order, stuff 15..18 in ``EMBEDDED_STUFF_CLASSES``
order. ``instances_*.json`` holds the things only. Image ids are 1-based within each split.

Determinism: image i of a split is drawn from ``numpy.random.default_rng([seed, split_stream, i])``, so the
same arguments give the same bytes, and the unlabelled split is a different random stream from train and val.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: photographed objects an ImageNet CNN knows (1: digits and drawn shapes)


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

# where a generated benchmark keeps each part, as ``data.*`` config values relative to its root
EMBEDDED_LAYOUT: dict[str, str] = {
    "format": "coco",
    "train_images": "train",
    "train_annotations": "annotations/instances_train.json",
    "val_images": "val",
    "val_annotations": "annotations/instances_val.json",
    "images": "unlabeled",
}


def embedded_data_overrides(root: str | os.PathLike[str]) -> list[str]:
    """Config overrides (``data.root`` and :data:`EMBEDDED_LAYOUT`) that point a run at the benchmark in ``root``."""
    return [f"data.root={json.dumps(str(Path(root)))}"] + [f"data.{k}={json.dumps(v)}" for k, v in EMBEDDED_LAYOUT.items()]


# pictures that show none of the thing classes: the "other" background behind everything
_BACKGROUND_PHOTOS = ("hubble_deep_field", "immunohistochemistry", "moon", "text", "page", "coins", "cell")
_STUFF_TINTS = {"brick": (165, 85, 65), "grass": (80, 145, 60), "gravel": (140, 135, 125)}  # mean RGB
_SPLIT_STREAMS = {"train": 0, "val": 1, "unlabeled": 2}
_MIN_SIDE = 12  # smallest object side (pixels)
# object side range as fractions of the image's shorter side (never below _MIN_SIDE pixels)
DEFAULT_OBJECT_SIZE: tuple[float, float] = (0.0, 0.45)
DEFAULT_MAX_OBJECTS = 8
_MAX_OCCLUDED = 0.7  # objects with more of their mask hidden than this are dropped (-> void)
_MIN_STUFF_AREA = 64  # smaller stuff segments become void
_SUPERSAMPLE = 4  # anti-aliasing factor for the elliptic matte
_SOURCE_SIDE = 256  # object pictures are stored with this longer side (enough for the largest drawn object)


def load_split(out_dir: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read ``out_dir/oneshot_split.json``: ``{"seen": [thing names], "unseen": [thing names]}``."""
    with open(Path(out_dir) / "oneshot_split.json") as f:
        split = json.load(f)
    if set(split) != {"seen", "unseen"} or set(split["seen"]) & set(split["unseen"]):
        raise ValueError(f"{out_dir}/oneshot_split.json must hold disjoint 'seen' and 'unseen' lists, got {split}")
    return {"seen": list(split["seen"]), "unseen": list(split["unseen"])}


# ----------------------------------------------------------------------------------------------------------------
# Compositing one image


@dataclass
class _Thing:
    rgb: np.ndarray  # (h, w, 3) float32 0-255: the object's region of its picture
    alpha: np.ndarray | None  # (h, w) float32 in [0, 1] for the alpha / silhouette mattes, else None
    matte: str


@dataclass
class _Assets:
    photos: list[Image.Image]  # RGB background photographs
    photo_names: list[str]
    textures: dict[str, Image.Image]  # mode "F", contrast-stretched to about [0, 1]
    things: list[_Thing]  # one per EMBEDDED_THING_CLASSES entry


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


def _load_thing(source: ThingSource, grass: np.ndarray) -> _Thing:
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
        return _Thing(rgb, alpha, source.matte)
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    image = Image.fromarray(np.ascontiguousarray(region)).resize(size, Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32)
    if source.matte == "alpha":
        alpha = array[..., 3] / 255.0
    return _Thing(array[..., :3].copy(), alpha, source.matte)


def _load_assets() -> _Assets:
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
    for name in _STUFF_TINTS:
        texture = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        low, high = np.percentile(texture, [2, 98])
        textures[name] = Image.fromarray((texture - low) / (high - low))
    grass = np.asarray(skimage.data.grass())
    things = [_load_thing(source, grass) for source in THING_SOURCES]
    return _Assets(photos, names, textures, things)


@dataclass
class _Instance:
    class_index: int  # position in EMBEDDED_THING_CLASSES
    mask: np.ndarray  # (H, W) bool, visible pixels


@dataclass
class _Composite:
    image: np.ndarray  # (H, W, 3) uint8
    instances: list[_Instance]  # kept things, in paste order
    stuff: np.ndarray  # (H, W) int8: position in EMBEDDED_STUFF_CLASSES, -1 under things and on void


def _background(rng: np.random.Generator, assets: _Assets, height: int, width: int) -> np.ndarray:
    photo = assets.photos[rng.integers(len(assets.photos))]
    aspect = width / height
    crop_h = photo.height * rng.uniform(0.35, 1.0)
    crop_w = min(crop_h * aspect, photo.width)
    crop_h = crop_w / aspect
    x0, y0 = rng.uniform(0, photo.width - crop_w), rng.uniform(0, photo.height - crop_h)
    crop = photo.resize((width, height), Image.BILINEAR, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    image = np.asarray(crop, dtype=np.float32) * rng.uniform(0.8, 1.2, size=3).astype(np.float32)
    return image[:, ::-1].copy() if rng.random() < 0.5 else image


def _region_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random polygon or band, (H, W) bool."""
    canvas = Image.new("L", (width, height))
    if rng.random() < 0.5:  # polygon around a random centre
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.25, 0.6) * min(height, width)
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=rng.integers(4, 8)))
        radii = radius * rng.uniform(0.6, 1.3, size=len(angles))
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    else:  # band across the image: a strip between two parallel lines
        angle = rng.uniform(0, np.pi)
        normal, along = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
        centre = np.array([width, height]) * rng.uniform(0.2, 0.8, size=2)
        half = rng.uniform(0.1, 0.22) * min(height, width)
        span = 2.0 * (height + width)
        corners = ((-1, -1), (-1, 1), (1, 1), (1, -1))  # (across, along) in units of (half, span)
        points = np.stack([centre + a * half * normal + b * span * along for a, b in corners])
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _texture_fill(
    rng: np.random.Generator, texture: Image.Image, tint: tuple[int, int, int], height: int, width: int
) -> np.ndarray:
    """A random crop of ``texture`` at a random scale, tinted around ``tint``: (H, W, 3) float RGB."""
    zoom = rng.uniform(0.6, min(1.8, texture.width / max(height, width)))  # texture pixels per image pixel
    crop_w, crop_h = width * zoom, height * zoom
    x0, y0 = rng.uniform(0, texture.width - crop_w), rng.uniform(0, texture.height - crop_h)
    pattern = np.asarray(texture.resize((width, height), Image.BILINEAR, box=(x0, y0, x0 + crop_w, y0 + crop_h)))
    colour = np.clip(np.asarray(tint) + rng.normal(0, 25, size=3), 30, 225).astype(np.float32)
    return colour * (0.45 + np.clip(pattern, 0, 1.2)[..., None])  # (H, W, 3)


def _crop_to_support(alpha: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    return alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _ellipse(height: int, width: int) -> np.ndarray:
    """An anti-aliased filled ellipse touching the sides of a (height, width) box: alpha in [0, 1]."""
    canvas = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE))
    ImageDraw.Draw(canvas).ellipse((0, 0, width * _SUPERSAMPLE - 1, height * _SUPERSAMPLE - 1), fill=255)
    return np.asarray(canvas.resize((width, height), Image.BOX), dtype=np.float32) / 255.0


def _thing_patch(rng: np.random.Generator, thing: _Thing, box_h: int, box_w: int) -> tuple[np.ndarray, np.ndarray]:
    """One instance of ``thing`` drawn into a (box_h, box_w) box: ``(rgb (h, w, 3) float, alpha (h, w))``.

    A random part of the picture (85-100 % of each side), mirrored at random, resized to the box; brightness,
    contrast and saturation jittered. The alpha is cropped to its support, so (h, w) may be smaller.
    """
    src_h, src_w = thing.rgb.shape[:2]
    part_h, part_w = src_h * rng.uniform(0.85, 1.0), src_w * rng.uniform(0.85, 1.0)
    y0, x0 = rng.uniform(0, src_h - part_h), rng.uniform(0, src_w - part_w)
    window = (x0, y0, x0 + part_w, y0 + part_h)
    channels = [Image.fromarray(np.ascontiguousarray(thing.rgb[..., c])) for c in range(3)]
    rgb = np.stack([np.asarray(c.resize((box_w, box_h), Image.BILINEAR, box=window)) for c in channels], axis=2)
    if thing.alpha is not None:
        alpha = np.asarray(Image.fromarray(thing.alpha).resize((box_w, box_h), Image.BILINEAR, box=window))
        alpha = np.clip(alpha, 0.0, 1.0)
    else:
        alpha = _ellipse(box_h, box_w)
    if rng.random() < 0.5:
        rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
    grey = rgb.mean(axis=2, keepdims=True)
    rgb = grey + (rgb - grey) * rng.uniform(0.6, 1.4)  # saturation
    mean = rgb.mean()
    rgb = (mean + (rgb - mean) * rng.uniform(0.7, 1.3)) * rng.uniform(0.75, 1.25)  # contrast, brightness
    rows, cols = np.flatnonzero((alpha >= 0.5).any(axis=1)), np.flatnonzero((alpha >= 0.5).any(axis=0))
    if len(rows) == 0:
        return rgb, alpha
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return np.clip(rgb[crop], 0, 255), alpha[crop]


def _compose(rng: np.random.Generator, assets: _Assets, height: int, width: int,
             object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE, max_objects: int = DEFAULT_MAX_OBJECTS) -> _Composite:
    image = _background(rng, assets, height, width)  # (H, W, 3) float
    stuff = np.full((height, width), len(EMBEDDED_STUFF_CLASSES) - 1, dtype=np.int8)  # all "other"
    for _ in range(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25])):
        index = rng.integers(len(_STUFF_TINTS))
        name = EMBEDDED_STUFF_CLASSES[index]
        region = _region_mask(rng, height, width)
        image[region] = _texture_fill(rng, assets.textures[name], _STUFF_TINTS[name], height, width)[region]
        stuff[region] = index

    owner = np.zeros((height, width), dtype=np.int16)  # k + 1 where object k is on top (alpha >= 0.5)
    full_areas, classes = [], []
    max_side = object_size[1] * min(height, width)
    min_side = min(max(_MIN_SIDE, object_size[0] * min(height, width)), max_side)
    for k in range(rng.integers(1, max_objects + 1)):
        class_index = int(rng.integers(len(EMBEDDED_THING_CLASSES)))
        thing = assets.things[class_index]
        side = math.exp(rng.uniform(math.log(min_side), math.log(max_side)))
        natural = thing.rgb.shape[1] / thing.rgb.shape[0]  # the picture's own width / height
        aspect = natural * math.exp(rng.uniform(-0.25, 0.25))
        aspect = min(max(aspect, 0.4), 2.5)
        box_h, box_w = (max(_MIN_SIDE, min(round(side * s), limit))
                        for s, limit in ((aspect ** -0.5, height), (aspect ** 0.5, width)))
        fill, alpha = _thing_patch(rng, thing, box_h, box_w)
        patch_h, patch_w = alpha.shape
        y0, x0 = rng.integers(0, height - patch_h + 1), rng.integers(0, width - patch_w + 1)
        window = (slice(y0, y0 + patch_h), slice(x0, x0 + patch_w))
        solid = alpha >= 0.5
        image[window] += alpha[..., None] * (fill - image[window])
        owner[window][solid] = k + 1
        full_areas.append(int(solid.sum()))
        classes.append(class_index)

    visible_areas = np.bincount(owner.ravel(), minlength=len(classes) + 1)[1:]
    instances = []
    for k, (class_index, full, visible) in enumerate(zip(classes, full_areas, visible_areas)):
        if full > 0 and visible >= (1.0 - _MAX_OCCLUDED) * full:
            instances.append(_Instance(class_index, owner == k + 1))
    stuff[owner > 0] = -1  # under kept things, or void where a dropped object shows
    for index in range(len(EMBEDDED_STUFF_CLASSES)):
        segment = stuff == index
        if 0 < segment.sum() < _MIN_STUFF_AREA:
            stuff[segment] = -1

    image += rng.standard_normal(size=image.shape, dtype=np.float32) * 2.5  # sensor noise
    return _Composite(np.clip(image + 0.5, 0, 255).astype(np.uint8), instances, stuff)


# ----------------------------------------------------------------------------------------------------------------
# Writing the dataset


def _tight_box(mask: np.ndarray) -> list[int]:
    """Tight box of a (H, W) bool mask as [x, y, w, h] pixels."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _categories() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(instance categories: things only, panoptic categories: things then stuff), ids from 1."""
    things = [
        {"id": i + 1, "name": source.name, "supercategory": "object", "picture": source.picture}
        for i, source in enumerate(THING_SOURCES)
    ]
    stuff = [
        {"id": len(things) + i + 1, "name": name, "supercategory": "texture" if name != "other" else "other"}
        for i, name in enumerate(EMBEDDED_STUFF_CLASSES)
    ]
    panoptic = [dict(c, isthing=1) for c in things] + [dict(c, isthing=0) for c in stuff]
    palette = np.random.default_rng(12345).integers(40, 256, size=(len(panoptic), 3))  # for visualisation only
    for category in panoptic:
        category["color"] = palette[category["id"] - 1].tolist()
    return things, panoptic


def _write_labelled(
    composite: _Composite, image_id: int, stem: str, png_dir: Path, next_ann_id: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write the panoptic PNG; return (COCO instance annotations, panoptic annotation)."""
    height, width = composite.stuff.shape
    segment_ids = np.zeros((height, width), dtype=np.int32)  # 0 = void
    instances, segments = [], []
    for k, instance in enumerate(composite.instances):
        rle = mask_utils.encode(np.asfortranarray(instance.mask, dtype=np.uint8))
        rle["counts"] = rle["counts"].decode("ascii")
        box, area = _tight_box(instance.mask), int(instance.mask.sum())
        category_id = instance.class_index + 1
        instances.append({"id": next_ann_id + k, "image_id": image_id, "category_id": category_id, "bbox": box,
                          "area": area, "iscrowd": 0, "segmentation": rle})  # fmt: skip
        segments.append({"id": k + 1, "category_id": category_id, "area": area, "bbox": box, "iscrowd": 0})
        segment_ids[instance.mask] = k + 1
    for index in np.unique(composite.stuff[composite.stuff >= 0]).tolist():
        mask = composite.stuff == index
        segment_id = len(segments) + 1
        segments.append({"id": segment_id, "category_id": len(EMBEDDED_THING_CLASSES) + index + 1,
                         "area": int(mask.sum()), "bbox": _tight_box(mask), "iscrowd": 0})  # fmt: skip
        segment_ids[mask] = segment_id
    rgb = np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 65536], axis=2).astype(np.uint8)
    Image.fromarray(rgb).save(png_dir / f"{stem}.png")
    return instances, {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments}


def _image_sizes(rng: np.random.Generator, image_size: tuple[int, int]) -> tuple[int, int]:
    low, high = image_size
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def _generate_split(
    split: str, count: int, seed: int, image_size: tuple[int, int], assets: _Assets, root: Path, progress: Any,
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE, max_objects: int = DEFAULT_MAX_OBJECTS,
) -> dict[str, int]:
    """Write one split's images (and annotations unless unlabelled) under ``root``; return its counts."""
    (root / split).mkdir()
    labelled = split != "unlabeled"
    if labelled:
        png_dir = root / "annotations" / f"panoptic_{split}"
        png_dir.mkdir()
    images, instances, panoptic = [], [], []
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], index])
        height, width = _image_sizes(rng, image_size)
        composite = _compose(rng, assets, height, width, object_size, max_objects)
        stem = f"{index:06d}"
        Image.fromarray(composite.image).save(root / split / f"{stem}.jpg", quality=95)
        if labelled:
            images.append({"id": index + 1, "file_name": f"{stem}.jpg", "width": width, "height": height})
            annotations, segments = _write_labelled(composite, index + 1, stem, png_dir, len(instances) + 1)
            instances.extend(annotations)
            panoptic.append(segments)
        progress.update(1)
    if not labelled:
        return {"images": count}
    things, panoptic_categories = _categories()
    info = {"description": "updetr embedded benchmark", "version": str(FORMAT_VERSION)}
    for name, annotations, categories in (
        (f"instances_{split}.json", instances, things),
        (f"panoptic_{split}.json", panoptic, panoptic_categories),
    ):
        data = {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        with open(root / "annotations" / name, "w") as f:
            json.dump(data, f)
    return {"images": count, "annotations": len(instances)}


def _validate_object_size(object_size: Any) -> tuple[float, float]:
    values = tuple(object_size) if isinstance(object_size, (tuple, list)) else ()
    if (len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or not 0.0 <= values[0] <= values[1] <= 1.0 or values[1] <= 0.0):
        raise ValueError(f"object_size must be (smallest, largest) fractions with 0 <= smallest <= largest <= 1, "
                         f"got {object_size!r}")
    return float(values[0]), float(values[1])


def _validate(
    seed: int, num_train: int, num_val: int, num_unlabeled: int, image_size: tuple[int, int]
) -> tuple[int, int]:
    def is_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("num_unlabeled", num_unlabeled, 0)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    sides = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(sides) != 2 or not all(is_int(v) for v in sides) or not 32 <= sides[0] <= sides[1] <= 2048:
        raise ValueError(
            f"image_size must be (min_side, max_side) ints with 32 <= min_side <= max_side <= 2048, got {image_size!r}"
        )
    return int(sides[0]), int(sides[1])


def generate_embedded(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 200,
    num_unlabeled: int = 1600,
    image_size: tuple[int, int] = (128, 192),
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate the embedded benchmark into ``out_dir`` (layout in the module docstring) and return its path.

    ``image_size`` is (min_side, max_side): each image's height and width are drawn independently from it.
    ``object_size`` is the (smallest, largest) object side as fractions of the image's shorter side; sides
    are drawn log-uniformly between them and never below 12 pixels. Each image draws 1 to ``max_objects``
    objects (before occluded ones are dropped).
    If ``out_dir/meta.json`` records the same arguments the folder is reused as is. A folder holding anything
    else raises ``FileExistsError`` unless ``overwrite``. The dataset is written into a temporary sibling folder
    and renamed at the end, so an interrupted run never leaves a half-written dataset behind.
    """
    image_size = _validate(seed, num_train, num_val, num_unlabeled, image_size)
    object_size = _validate_object_size(object_size)
    if not isinstance(max_objects, (int, np.integer)) or isinstance(max_objects, bool) or not 1 <= max_objects <= 64:
        raise ValueError(f"max_objects must be an int from 1 to 64, got {max_objects!r}")
    out_dir = Path(out_dir)
    arguments = {"seed": int(seed), "num_train": int(num_train), "num_val": int(num_val),
                 "num_unlabeled": int(num_unlabeled), "image_size": list(image_size)}  # fmt: skip
    if object_size != DEFAULT_OBJECT_SIZE:
        arguments["object_size"] = list(object_size)
    if max_objects != DEFAULT_MAX_OBJECTS:
        arguments["max_objects"] = int(max_objects)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        try:
            existing = json.loads((out_dir / "meta.json").read_text())
        except (OSError, ValueError):
            existing = None
        same = (
            isinstance(existing, dict)
            and existing.get("format_version") == FORMAT_VERSION
            and existing.get("arguments") == arguments
        )
        if same:
            logger.info("reusing the embedded benchmark in %s", out_dir)
            return out_dir
        if not overwrite:
            if isinstance(existing, dict):
                held = (f"a different configuration {existing.get('arguments')} "
                        f"(format {existing.get('format_version')})")  # fmt: skip
            else:
                held = "something other than an embedded benchmark (no readable meta.json)"
            raise FileExistsError(f"{out_dir} holds {held}, not the requested {arguments} (format {FORMAT_VERSION});"
                                  " pass overwrite=True or choose another folder")  # fmt: skip

    assets = _load_assets()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "annotations").mkdir(parents=True)
        counts = {}
        with tqdm(total=num_train + num_val + num_unlabeled, desc="embedded benchmark", disable=not progress) as bar:
            for split, count in (("train", num_train), ("val", num_val), ("unlabeled", num_unlabeled)):
                counts[split] = _generate_split(split, count, seed, image_size, assets, staging, bar, object_size,
                                                 int(max_objects))
        unseen = list(ONESHOT_UNSEEN)
        split = {"seen": [name for name in EMBEDDED_THING_CLASSES if name not in unseen], "unseen": unseen}
        (staging / "oneshot_split.json").write_text(json.dumps(split, indent=1) + "\n")
        meta = {"format_version": FORMAT_VERSION, "arguments": arguments, "counts": counts,
                "thing_classes": list(EMBEDDED_THING_CLASSES), "stuff_classes": list(EMBEDDED_STUFF_CLASSES),
                "photos": assets.photo_names, "textures": list(_STUFF_TINTS),
                "thing_pictures": {source.name: source.picture for source in THING_SOURCES}}  # fmt: skip
        (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # written last: marks completion
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, retired)
            shutil.rmtree(retired)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
