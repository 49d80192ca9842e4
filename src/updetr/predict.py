"""``updetr predict``: detections as JSON plus images with the boxes drawn."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.folder import ImageFolder, finish_skipped
from .data.transforms import build_transforms
from .engine.inference import LoadedModel
from .evaluation.postprocess import postprocess_detections
from .structures import ImageBatch
from .visualize import draw_detections, save_image


@torch.inference_mode()
def predict_images(
    loaded: LoadedModel,
    inputs: list[str],
    output_dir: str | Path,
    *,
    threshold: float = 0.5,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Path:
    """Detect objects in image files/folders; writes ``detections.json`` and ``<name>.png`` per image.

    ``detections.json`` holds, per readable image, ``{"file", "width", "height", "detections":
    [{"label", "category_id", "score", "box_xyxy": [x0, y0, x1, y1] pixels}]}``. Images that
    cannot be read are skipped with a warning and listed in ``skipped.json`` (``[{"file",
    "error"}]``; no such file when none was skipped); a DataError only when none can be read.
    """
    out = Path(output_dir)
    dataset = ImageFolder(inputs, transforms=build_transforms(loaded.config.data, train=False))
    results, skipped = [], []
    usable = dataset.iter_usable(skipped)
    for i, pixels, info, image in tqdm(usable, total=len(dataset), desc="predict", disable=not progress, dynamic_ncols=True):
        batch = ImageBatch.from_tensors([pixels]).to(device)
        output = loaded.model(batch)
        det = postprocess_detections(output, info["orig_size"].view(1, 2).to(device))[0]
        keep = det["scores"] >= threshold
        scores, labels, boxes_xyxy = det["scores"][keep].cpu(), det["labels"][keep].cpu(), det["boxes_xyxy"][keep].cpu()
        order = scores.argsort(descending=True)
        scores, labels, boxes_xyxy = scores[order], labels[order], boxes_xyxy[order]
        names = [loaded.classes[int(lab)] for lab in labels]
        path = Path(info["path"])
        h, w = (int(x) for x in info["orig_size"])
        results.append({
            "file": str(path), "width": w, "height": h,
            "detections": [
                {"label": n, "category_id": int(loaded.category_ids[int(lab)]), "score": round(float(s), 4),
                 "box_xyxy": [round(float(v), 2) for v in b]}
                for n, lab, s, b in zip(names, labels, scores, boxes_xyxy)
            ],
        })
        drawn = draw_detections(image, boxes_xyxy, names, scores, color_ids=[int(lab) for lab in labels])
        save_image(drawn, out / f"{i:04d}_{path.stem}.png")
    finish_skipped(out, skipped, len(dataset))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "detections.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "detections.json")
    return out
