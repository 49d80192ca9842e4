"""``updetr query``: where does a pre-trained UP-DETR model find each query patch?

The paper's visualisation of random query patch detection, and the first thing to try
after pre-training. Patches are crops of the target image (``--box``) or of another
image (``--exemplar``), resized to the model's query size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from .box_ops import normalized_cxcywh_to_xyxy_px
from .data.io import DataError, load_image, parse_box, parse_image_box
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from .engine.inference import LoadedModel
from .structures import ImageBatch
from .visualize import draw_detections, save_image


@dataclass
class QueryResult:
    box_xyxy: list[float]  # where the model finds the patch, pixels of the target image
    score: float  # probability of "patch" for the chosen query
    query_box_xyxy: list[float] | None  # where the patch was cut from, when it is a crop of the target


def crop_patch(image: Image.Image, box_xywh: tuple[float, float, float, float], size: int, source: str, min_size: int = 8) -> torch.Tensor:
    """Crop ``box`` (pixels) from ``image``, resize to ``size``², normalise: (3, size, size)."""
    x, y, w, h = box_xywh
    if w < min_size or h < min_size:
        raise DataError(f"{source}: box {box_xywh} is smaller than the minimum patch side of {min_size} pixels")
    if x < 0 or y < 0 or x + w > image.width or y + h > image.height:
        raise DataError(f"{source}: box {box_xywh} lies outside the {image.width}x{image.height} image")
    return patch_pixels(image, box_xywh, size)


def patch_pixels(image: Image.Image, box_xywh: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """The query patch of an already checked ``box`` (pixels, x y w h): cropped, resized to ``size``², normalised."""
    x, y, w, h = box_xywh
    pixels = F.pil_to_tensor(image)  # uint8 (3, H, W)
    patch = F.resized_crop(pixels, round(y), round(x), max(1, round(h)), max(1, round(w)), [size, size], antialias=True)
    patch = F.to_dtype(patch, torch.float32, scale=True)
    return F.normalize(patch, list(IMAGENET_MEAN), list(IMAGENET_STD))


@torch.inference_mode()
def query_image(loaded: LoadedModel, image: Image.Image, patches: torch.Tensor, device: torch.device | str = "cpu") -> list[tuple[list[float], float]]:
    """Run a pre-training model on one image with k ≤ M patches (k, 3, q, q).

    Returns, per patch, the box (xyxy pixels) of its group's most confident query and that
    query's "patch" probability.
    """
    model = loaded.model
    k = patches.shape[0]
    if k > model.num_patches:
        raise ValueError(f"{k} query patches given; this model takes at most M={model.num_patches}")
    transform = build_transforms(loaded.config.data, train=False)
    pixels, _ = transform(image, {})
    out = model(ImageBatch.from_tensors([pixels]).to(device), patches.unsqueeze(0).to(device))
    scores = out.logits.softmax(-1)[0, :, 0].view(k, -1)  # (k, Q/M)
    best = scores.argmax(-1)  # (k,)
    boxes_cxcywh = out.boxes_cxcywh[0].view(k, -1, 4)[torch.arange(k), best]  # (k, 4) normalised
    boxes_xyxy = normalized_cxcywh_to_xyxy_px(boxes_cxcywh.cpu(), torch.tensor([image.height, image.width]))
    return [(b.tolist(), float(s)) for b, s in zip(boxes_xyxy, scores[torch.arange(k), best].cpu())]


def run_query(
    loaded: LoadedModel,
    image_path: str | Path,
    *,
    boxes: list[str] | None = None,
    exemplars: list[str] | None = None,
    output_dir: str | Path = "query",
    device: torch.device | str = "cpu",
) -> list[QueryResult]:
    """Query with crops of the image itself (``boxes``) or with exemplars ``IMG[:x,y,w,h]``.

    Writes ``OUT/<image>_query.png`` (found boxes; dashed-free thin boxes where patches were
    cut) and ``OUT/<image>_query.json``.
    """
    if loaded.task != "pretrain":
        raise ValueError("updetr query needs a pre-training checkpoint (updetr pretrain, or a converted UP-DETR pre-training file)")
    if not boxes and not exemplars:
        raise ValueError("give at least one --box x,y,w,h or --exemplar IMG[:x,y,w,h]")
    image = load_image(image_path)
    q = loaded.config.pretrain.query_size
    min_side = loaded.config.pretrain.min_patch_size
    patches, sources = [], []
    for text in boxes or []:
        box = parse_box(text, "--box")
        patches.append(crop_patch(image, box, q, str(image_path), min_side))
        sources.append([box[0], box[1], box[0] + box[2], box[1] + box[3]])
    for text in exemplars or []:
        path, given = parse_image_box(text)
        exemplar = load_image(path)
        box = given or (0.0, 0.0, float(exemplar.width), float(exemplar.height))
        patches.append(crop_patch(exemplar, box, q, str(path), min_side))
        sources.append(None)
    found = query_image(loaded, image, torch.stack(patches), device)
    results = [QueryResult(box, score, src) for (box, score), src in zip(found, sources)]

    out = Path(output_dir)
    stem = Path(image_path).stem
    drawn = image
    given = [r.query_box_xyxy for r in results if r.query_box_xyxy is not None]
    if given:
        drawn = draw_detections(drawn, torch.tensor(given), [f"patch {i}" for i, r in enumerate(results) if r.query_box_xyxy is not None], width=1)
    drawn = draw_detections(drawn, torch.tensor([r.box_xyxy for r in results]), [f"found {i}" for i in range(len(results))],
                            torch.tensor([r.score for r in results]), width=3)
    save_image(drawn, out / f"{stem}_query.png")
    (out / f"{stem}_query.json").write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    return results
