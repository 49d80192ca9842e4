"""One-shot prediction: every detection of an exemplar's class in some images, as JSON and drawn images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as F
from tqdm.auto import tqdm

from .box_ops import normalized_cxcywh_to_xyxy_px
from .data.exemplar_patches import check_exemplar_box, crop_query_patch
from .data.folder import ImageFolder, finish_skipped
from .data.io import load_image
from .data.transforms import build_transforms
from .engine.inference import LoadedModel
from .models.one_shot import MATCH_LABEL
from .structures import ImageBatch
from .visualize import draw_detections, save_image

__all__ = ["predict_one_shot"]


@torch.inference_mode()
def predict_one_shot(
    loaded: LoadedModel, exemplar: str | Path, box_xywh: tuple[float, float, float, float] | None,
    images: list[str], output_dir: str | Path, *, threshold: float = 0.5, label: str = "match",
    device: torch.device | str = "cpu", progress: bool = True,
) -> Path:
    """Detect every object of the exemplar's class in ``images`` (files or folders).

    ``box_xywh``: the exemplar's box in pixels of ``exemplar`` (None: the whole image).
    Writes ``detections.json`` (``{"exemplar": {"file", "box_xywh"}, "images": [{"file",
    "width", "height", "detections": [{"score", "box_xyxy"}]}]}``), ``exemplar.png`` (the box
    drawn) and one ``<index>_<name>.png`` per image with the detections of score >= ``threshold``.
    """
    exemplar = Path(exemplar)
    picture = load_image(exemplar)
    hw = (picture.height, picture.width)
    box_xywh = box_xywh or (0.0, 0.0, float(picture.width), float(picture.height))
    x, y, w, h = box_xywh
    box_xyxy = (x, y, x + w, y + h)
    check_exemplar_box(box_xyxy, hw, loaded.config.oneshot.min_exemplar_size, f"--exemplar {exemplar}")
    patch = crop_query_patch(F.pil_to_tensor(picture), box_xyxy, loaded.config.pretrain.query_size)[None].to(device)
    out = Path(output_dir)
    save_image(draw_detections(picture, torch.tensor([box_xyxy]), ["exemplar"]), out / "exemplar.png")
    dataset = ImageFolder(images, transforms=build_transforms(loaded.config.data, train=False))
    results, skipped = [], []
    usable = dataset.iter_usable(skipped)  # an unreadable image is skipped and listed in skipped.json
    for i, pixels, info, image in tqdm(usable, total=len(dataset), desc="one-shot predict", disable=not progress,
                                       dynamic_ncols=True):
        output = loaded.model(ImageBatch.from_tensors([pixels]).to(device), patch)
        scores = output.logits.float().softmax(-1)[0, :, MATCH_LABEL].cpu()  # (Q,)
        boxes_xyxy = normalized_cxcywh_to_xyxy_px(output.boxes_cxcywh[0].float().cpu(), info["orig_size"])  # (Q, 4)
        keep = scores >= threshold
        order = scores[keep].argsort(descending=True)
        scores, boxes_xyxy = scores[keep][order], boxes_xyxy[keep][order]
        path = Path(info["path"])
        height, width = (int(v) for v in info["orig_size"])
        results.append({"file": str(path), "width": width, "height": height, "detections": [
            {"score": round(float(s), 4), "box_xyxy": [round(float(v), 2) for v in b]} for s, b in zip(scores, boxes_xyxy)]})
        drawn = draw_detections(image, boxes_xyxy, [label] * len(scores), scores, color_ids=[0] * len(scores))
        save_image(drawn, out / f"{i:04d}_{path.stem}.png")
    finish_skipped(out, skipped, len(dataset))
    payload = {"exemplar": {"file": str(exemplar), "box_xywh": list(box_xywh)}, "threshold": threshold, "images": results}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "detections.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out / "detections.json")
    return out
