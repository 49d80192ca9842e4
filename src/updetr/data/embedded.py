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
    1. Background: a random crop (random scale, horizontal flip, mild colour cast) of one of scikit-image's
       bundled photographs.
    2. Stuff: 1-3 random polygons or bands filled with a tinted scikit-image texture (brick, grass, gravel).
       Whatever the photograph still shows is the stuff class ``other``, so a panoptic PNG labels every pixel
       except the void ones (below).
    3. Things: 1-8 objects (``max_objects``), each a handwritten digit (sklearn ``load_digits``, even-index samples only,
       upscaled smoothly and alpha-matted so the strokes are the object) or a drawn shape, with a random
       colour that differs clearly from what lies under it, side 12 px to 45% of the image side by default
       (``object_size``). Later objects
       paste over earlier ones; an object more than 70% occluded is dropped and its remaining visible pixels
       become void (panoptic id 0), like unannotated objects in real data. An object's mask is its visible
       pixels of alpha >= 0.5, and its box is the tight box of that mask.

Category ids: things 1..14 in ``EMBEDDED_THING_CLASSES`` order, stuff 15..18 in ``EMBEDDED_STUFF_CLASSES``
order. ``instances_*.json`` holds the things only. Image ids are 1-based within each split.

Determinism: image i of a split is drawn from ``numpy.random.default_rng([seed, split_stream, i])``, so the
same arguments give the same bytes, and the unlabelled split is a different random stream from train and val.
Odd-index digit samples are never drawn (``RESERVED_DIGIT_PARITY``), so a backbone can be pre-trained on
``reserved_digit_samples()`` without seeing any digit of the benchmark.
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

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
EMBEDDED_THING_CLASSES: tuple[str, ...] = tuple(f"digit_{d}" for d in range(10)) + (
    "circle",
    "square",
    "triangle",
    "cross",
)
EMBEDDED_STUFF_CLASSES: tuple[str, ...] = ("brick", "grass", "gravel", "other")  # "other" = photo background
ONESHOT_UNSEEN: tuple[str, ...] = ("digit_3", "digit_7", "triangle", "cross")  # 10 seen / 4 unseen
RESERVED_DIGIT_PARITY = 1  # digit samples with index % 2 == 1 are never used by the benchmark

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


_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
           "immunohistochemistry", "coins", "moon", "clock")  # fmt: skip
_STUFF_TINTS = {"brick": (165, 85, 65), "grass": (80, 145, 60), "gravel": (140, 135, 125)}  # mean RGB
_SPLIT_STREAMS = {"train": 0, "val": 1, "unlabeled": 2}
_MIN_SIDE = 12  # smallest object side (pixels)
# object side range as fractions of the image's shorter side (never below _MIN_SIDE pixels)
DEFAULT_OBJECT_SIZE: tuple[float, float] = (0.0, 0.45)
DEFAULT_MAX_OBJECTS = 8
_MAX_OCCLUDED = 0.7  # objects with more of their mask hidden than this are dropped (-> void)
_MIN_STUFF_AREA = 64  # smaller stuff segments become void
_MIN_COLOUR_DISTANCE = 90.0  # RGB distance between an object's colour and the mean colour under it
_SUPERSAMPLE = 4  # anti-aliasing factor for drawn shapes


def _digit_source() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)  # (1797, 8, 8) in [0, 1]


def _digit_samples(reserved: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images, labels, indices in load_digits)`` of the reserved (odd) or the benchmark's (even) samples."""
    images, labels = _digit_source()
    indices = np.flatnonzero((np.arange(len(labels)) % 2 == RESERVED_DIGIT_PARITY) == reserved)
    return images[indices], labels[indices], indices


def benchmark_digit_samples() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The digit samples the benchmark draws from: ``(images (K, 8, 8) float in [0, 1], labels (K,), indices (K,))``,
    where ``indices`` are the even positions in ``sklearn.datasets.load_digits``."""
    return _digit_samples(reserved=False)


def reserved_digit_samples() -> tuple[np.ndarray, np.ndarray]:
    """The digit samples the benchmark never uses (odd index in ``load_digits``): ``(images (K, 8, 8) float in
    [0, 1], labels (K,))``, for pre-training a backbone on material disjoint from the benchmark."""
    return _digit_samples(reserved=True)[:2]


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
class _Assets:
    photos: list[Image.Image]  # RGB photographs
    photo_names: list[str]
    textures: dict[str, Image.Image]  # mode "F", contrast-stretched to about [0, 1]
    digit_images: np.ndarray  # (K, 8, 8) float in [0, 1]: even-index samples (odd ones for reserved assets)
    digit_labels: np.ndarray  # (K,)
    digit_indices: np.ndarray  # (K,) index in load_digits
    digits_by_label: list[np.ndarray]  # positions into the arrays above, one array per digit


def _load_assets(reserved: bool = False) -> _Assets:
    """Photographs, textures and digits; ``reserved`` takes the digit samples the benchmark never uses."""
    import skimage.data

    photos, names = [], []
    for name in _PHOTOS:
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
    images, labels, indices = _digit_samples(reserved)
    by_label = [np.flatnonzero(labels == d) for d in range(10)]
    return _Assets(photos, names, textures, images, labels, indices, by_label)


def reserved_assets() -> _Assets:
    """The benchmark's photographs and textures with the reserved digit samples (odd indices) instead of its own."""
    return _load_assets(reserved=True)


_RESERVED_STREAM = 99  # random stream of reserved scenes; the benchmark's splits use _SPLIT_STREAMS


def render_reserved_scenes(num: int, size: int, seed: int = 0) -> np.ndarray:
    """``num`` square scenes (N, size, size, 3) uint8 composed like benchmark images, from reserved digits only.

    Drawn from their own random stream, so no scene equals a benchmark image and no benchmark digit sample
    appears: material for pre-training a backbone without touching the benchmark.
    """
    assets = reserved_assets()
    out = np.empty((num, size, size, 3), dtype=np.uint8)
    for i in range(num):
        out[i] = _compose(np.random.default_rng([seed, _RESERVED_STREAM, i]), assets, size, size).image
    return out


def render_reserved_class_maps(
    num: int,
    size: int,
    seed: int = 0,
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
    max_objects: int = DEFAULT_MAX_OBJECTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Reserved scenes with a class map each: ``(images (N, S, S, 3) uint8, maps (N, S, S) int64)``.

    A map holds, at every pixel, the thing class (position in :data:`EMBEDDED_THING_CLASSES`) of the topmost
    kept object whose box covers it, and ``len(EMBEDDED_THING_CLASSES)`` for background. Scenes come from the
    reserved stream and the reserved digits (as :func:`render_reserved_scenes`, with a stream of their own), so a
    backbone trained on these maps never sees a benchmark image or a benchmark label.
    """
    assets = reserved_assets()
    object_size = _validate_object_size(object_size)
    images = np.empty((num, size, size, 3), dtype=np.uint8)
    maps = np.full((num, size, size), len(EMBEDDED_THING_CLASSES), dtype=np.int64)
    for i in range(num):
        scene = _compose(np.random.default_rng([seed, _RESERVED_STREAM + 1, i]), assets, size, size,
                         object_size=object_size, max_objects=max_objects)
        images[i] = scene.image
        for instance in scene.instances:  # paste order: later (upper) objects overwrite earlier ones
            x0, y0, w, h = _tight_box(instance.mask)
            maps[i, y0:y0 + h, x0:x0 + w] = instance.class_index
    return images, maps


@dataclass
class _Instance:
    class_index: int  # position in EMBEDDED_THING_CLASSES
    mask: np.ndarray  # (H, W) bool, visible pixels
    digit_index: int | None  # index in load_digits, for digits


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


def _digit_alpha(rng: np.random.Generator, digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upscale an 8x8 digit smoothly to about (height, width) and matte its strokes: (h, w) alpha in [0, 1]."""
    padded = Image.fromarray(np.pad(digit, 1))  # mode "F", 10x10, so rotation does not clip strokes
    padded = padded.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    upscaled = np.asarray(padded.resize((round(width * 1.25), round(height * 1.25)), Image.BICUBIC))
    return _crop_to_support(np.clip((upscaled - 0.3) / 0.25, 0.0, 1.0))


_UNIT_POLYGONS = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)],
}


def _shape_alpha(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """Draw a filled shape filling a (height, width) box, anti-aliased: (h, w) alpha in [0, 1]."""
    big_w, big_h = width * _SUPERSAMPLE, height * _SUPERSAMPLE
    canvas = Image.new("L", (big_w, big_h))
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse((0, 0, big_w - 1, big_h - 1), fill=255)
    else:
        if kind == "cross":
            t = rng.uniform(0.22, 0.36)  # half-thickness of the arms
            unit = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
                    (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]  # fmt: skip
        else:
            unit = _UNIT_POLYGONS[kind]
        angle = rng.uniform(-0.45, 0.45)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        points = np.asarray(unit) @ rotation.T
        points = (points - points.min(0)) / np.ptp(points, axis=0) * [big_w - 1, big_h - 1]
        draw.polygon([tuple(p) for p in points.tolist()], fill=255)
    alpha = np.asarray(canvas.resize((width, height), Image.BOX), dtype=np.float32) / 255.0
    return _crop_to_support(alpha)


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least _MIN_COLOUR_DISTANCE from ``under`` (mean RGB below the object)."""
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - under) >= _MIN_COLOUR_DISTANCE:
            return colour.astype(np.float32)
    return np.where(under > 127, 20.0, 235.0).astype(np.float32)


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
    full_areas, classes, digit_indices = [], [], []
    max_side = object_size[1] * min(height, width)
    min_side = min(max(_MIN_SIDE, object_size[0] * min(height, width)), max_side)
    for k in range(rng.integers(1, max_objects + 1)):
        class_index = int(rng.integers(len(EMBEDDED_THING_CLASSES)))
        side = math.exp(rng.uniform(math.log(min_side), math.log(max_side)))
        aspect = math.exp(rng.uniform(-0.2, 0.2))
        box_h, box_w = (max(_MIN_SIDE, round(side * s)) for s in (aspect**0.5, aspect**-0.5))
        digit_index = None
        if class_index < 10:
            pick = rng.choice(assets.digits_by_label[class_index])
            digit_index = int(assets.digit_indices[pick])
            alpha = _digit_alpha(rng, assets.digit_images[pick], box_h, box_w)
        else:
            alpha = _shape_alpha(rng, EMBEDDED_THING_CLASSES[class_index], box_h, box_w)
        patch_h, patch_w = alpha.shape
        y0, x0 = rng.integers(0, height - patch_h + 1), rng.integers(0, width - patch_w + 1)
        window = (slice(y0, y0 + patch_h), slice(x0, x0 + patch_w))
        solid = alpha >= 0.5
        colour = _object_colour(rng, image[window][solid].mean(axis=0))
        ramp = np.linspace(-1.0, 1.0, patch_w, dtype=np.float32)[None, :] * rng.uniform(-0.2, 0.2)
        ramp = ramp + np.linspace(-1.0, 1.0, patch_h, dtype=np.float32)[:, None] * rng.uniform(-0.2, 0.2)
        fill = np.clip(colour * (1.0 + ramp)[..., None], 0, 255)  # (h, w, 3) shaded object colour
        image[window] += alpha[..., None] * (fill - image[window])
        owner[window][solid] = k + 1
        full_areas.append(int(solid.sum()))
        classes.append(class_index)
        digit_indices.append(digit_index)

    visible_areas = np.bincount(owner.ravel(), minlength=len(classes) + 1)[1:]
    instances = []
    for k, (class_index, full, visible) in enumerate(zip(classes, full_areas, visible_areas)):
        if visible >= (1.0 - _MAX_OCCLUDED) * full:
            instances.append(_Instance(class_index, owner == k + 1, digit_indices[k]))
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
        {"id": i + 1, "name": name, "supercategory": "digit" if name.startswith("digit") else "shape"}
        for i, name in enumerate(EMBEDDED_THING_CLASSES)
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
    from pycocotools import mask as mask_utils

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

    from tqdm import tqdm

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
                "digits": "sklearn load_digits, even indices only (odd indices reserved)"}  # fmt: skip
        (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # written last: marks completion
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, retired)
            shutil.rmtree(retired)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
