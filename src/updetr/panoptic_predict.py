"""Panoptic prediction: per image a COCO panoptic PNG, a colour overlay, and one ``panoptic.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data.coco_panoptic import id_to_rgb
from .data.folder import ImageFolder, finish_skipped
from .data.transforms import build_transforms
from .evaluation.panoptic_postprocess import postprocess_panoptic
from .structures import ImageBatch
from .visualize import save_image

__all__ = ["predict_panoptic", "panoptic_overlay"]


@torch.inference_mode()
def predict_panoptic(
    loaded: Any, inputs: list[str], output_dir: str | Path, *, threshold: float = 0.85, min_area: int = 5,
    device: torch.device | str = "cpu", progress: bool = True,
) -> Path:
    """Segment image files/folders. Per image ``NNNN_<stem>.png`` (COCO panoptic ids as RGB),
    ``NNNN_<stem>_overlay.png`` (colours over the image) and one ``panoptic.json``:
    ``{"annotations": [{"image_id", "file_name", "image", "width", "height", "segments_info"}],
    "categories": [...]}`` in COCO panoptic form."""
    out = Path(output_dir)
    dataset = ImageFolder(inputs, transforms=build_transforms(loaded.config.data, train=False))  # files and folders
    annotations, skipped = [], []
    usable = dataset.iter_usable(skipped)  # an unreadable image is skipped and listed in skipped.json
    for i, pixels, info, image in tqdm(usable, total=len(dataset), desc="panoptic", disable=not progress, dynamic_ncols=True):
        batch = ImageBatch.from_tensors([pixels]).to(device)
        output = loaded.model(batch)
        segmentation = postprocess_panoptic(
            output, info["size"].view(1, 2), info["orig_size"].view(1, 2), isthing=loaded.isthing,
            category_ids=loaded.category_ids, threshold=threshold, min_area=min_area,
        )[0]
        path = Path(info["path"])
        stem = f"{i:04d}_{path.stem}"
        ids = segmentation.segment_ids.cpu().numpy()
        save_image(Image.fromarray(id_to_rgb(ids)), out / f"{stem}.png")
        overlay = panoptic_overlay(image, ids, segmentation.segments_info, loaded.categories)
        save_image(overlay, out / f"{stem}_overlay.png")
        names = {c["id"]: c["name"] for c in loaded.categories}
        annotations.append({
            "image_id": i, "file_name": f"{stem}.png", "image": str(path), "height": int(ids.shape[0]), "width": int(ids.shape[1]),
            "segments_info": [dict(s, name=names[s["category_id"]]) for s in segmentation.segments_info],
        })
    finish_skipped(out, skipped, len(dataset))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "panoptic.json.tmp"
    tmp.write_text(json.dumps({"annotations": annotations, "categories": loaded.categories}, indent=1) + "\n")
    tmp.replace(out / "panoptic.json")
    return out


def panoptic_overlay(
    image: Image.Image, segment_ids: np.ndarray, segments_info: list[dict[str, Any]], categories: list[dict[str, Any]],
    alpha: float = 0.5,
) -> Image.Image:
    """``image`` blended with one colour per segment (the category's ``color`` when it has one;
    thing instances of a class shifted apart), segment borders dark, void left as is."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = {c["id"]: np.asarray(c.get("color") or _fallback_colour(c["id"]), dtype=np.float32) for c in categories}
    painted = rgb.copy()
    for k, segment in enumerate(segments_info):
        colour = colours.get(segment["category_id"], _fallback_colour(segment["category_id"]))
        if segment.get("isthing"):
            colour = np.clip(colour + np.asarray(_fallback_colour(k + 7)) * 0.35 - 45, 0, 255)
        mask = segment_ids == segment["id"]
        painted[mask] = (1 - alpha) * rgb[mask] + alpha * colour
    border = np.zeros(segment_ids.shape, dtype=bool)
    border[1:] |= segment_ids[1:] != segment_ids[:-1]
    border[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
    painted[border] *= 0.3
    return Image.fromarray(np.clip(painted + 0.5, 0, 255).astype(np.uint8))


def _fallback_colour(key: int) -> np.ndarray:
    return np.random.default_rng(int(key) + 1000).integers(40, 256, size=3).astype(np.float32)
