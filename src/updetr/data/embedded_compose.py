"""One image of the embedded benchmark (``updetr.data.embedded``), composed from the bundled material of
``updetr.data.embedded_sources``; every draw comes from the generator passed in.

Content of one image (H and W are given):
1. Background: a random crop (random scale, horizontal flip, mild colour cast) of one of the bundled
   photographs that show no object class (``embedded_sources``: star field, tissue, moon, text, coins ...).
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from updetr.data.embedded_sources import EMBEDDED_STUFF_CLASSES, EMBEDDED_THING_CLASSES, STUFF_TINTS, Assets, Thing

_MIN_SIDE = 12  # smallest object side (pixels)
# object side range as fractions of the image's shorter side (never below _MIN_SIDE pixels)
DEFAULT_OBJECT_SIZE: tuple[float, float] = (0.0, 0.45)
DEFAULT_MAX_OBJECTS = 8
_MAX_OCCLUDED = 0.7  # objects with more of their mask hidden than this are dropped (-> void)
_MIN_STUFF_AREA = 64  # smaller stuff segments become void
_SUPERSAMPLE = 4  # anti-aliasing factor for the elliptic matte


@dataclass
class _Instance:
    class_index: int  # position in EMBEDDED_THING_CLASSES
    mask: np.ndarray  # (H, W) bool, visible pixels


@dataclass
class Composite:
    """One composed image and what it shows: its kept things and the stuff class of every other pixel."""

    image: np.ndarray  # (H, W, 3) uint8
    instances: list[_Instance]  # kept things, in paste order
    stuff: np.ndarray  # (H, W) int8: position in EMBEDDED_STUFF_CLASSES, -1 under things and on void


def _background(rng: np.random.Generator, assets: Assets, height: int, width: int) -> np.ndarray:
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


def _ellipse(height: int, width: int) -> np.ndarray:
    """An anti-aliased filled ellipse touching the sides of a (height, width) box: alpha in [0, 1]."""
    canvas = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE))
    ImageDraw.Draw(canvas).ellipse((0, 0, width * _SUPERSAMPLE - 1, height * _SUPERSAMPLE - 1), fill=255)
    return np.asarray(canvas.resize((width, height), Image.BOX), dtype=np.float32) / 255.0


def _thing_patch(rng: np.random.Generator, thing: Thing, box_h: int, box_w: int) -> tuple[np.ndarray, np.ndarray]:
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


def compose(rng: np.random.Generator, assets: Assets, height: int, width: int,
             object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE, max_objects: int = DEFAULT_MAX_OBJECTS) -> Composite:
    image = _background(rng, assets, height, width)  # (H, W, 3) float
    stuff = np.full((height, width), len(EMBEDDED_STUFF_CLASSES) - 1, dtype=np.int8)  # all "other"
    for _ in range(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25])):
        index = rng.integers(len(STUFF_TINTS))
        name = EMBEDDED_STUFF_CLASSES[index]
        region = _region_mask(rng, height, width)
        image[region] = _texture_fill(rng, assets.textures[name], STUFF_TINTS[name], height, width)[region]
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
    return Composite(np.clip(image + 0.5, 0, 255).astype(np.uint8), instances, stuff)
