"""Reports generated from run logs (``metrics.jsonl``) and checkpoints — never typed in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from .data.embedded_sources import bundled_picture
from .data.folder import ImageFolder
from .data.io import load_image
from .data.query_patches import sample_patch_boxes
from .data.transforms import build_transforms
from .engine.distributed import resolve_device
from .engine.inference import load_trained
from .evaluation.postprocess import postprocess_detections
from .query import crop_patch, query_image
from .structures import ImageBatch
from .visualize import draw_detections, save_image

METRICS = ("AP", "AP50", "AP75")


def read_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_points(history: list[dict]) -> list[dict]:
    return [r for r in history if "val/AP" in r]


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def _fmt_gap(v: float) -> str:
    """A signed difference; one that rounds to zero is shown as 0.0, not -0.0."""
    text = f"{v:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


def comparison_table(arms: dict[str, Path]) -> str:
    """Final AP / AP50 / AP75 of each arm (Table 1 style) plus the gap, and AP at every evaluation point."""
    finals = {name: eval_points(read_history(d))[-1] for name, d in arms.items()}
    lines = ["| Model | epochs | AP | AP50 | AP75 |", "|---|---|---|---|---|"]
    for name, rec in finals.items():
        lines.append(f"| {name} | {rec['epoch'] + 1} | " + " | ".join(_fmt(rec[f'val/{m}']) for m in METRICS) + " |")
    if "DETR" in finals and "UP-DETR" in finals:
        delta = [finals["UP-DETR"][f"val/{m}"] - finals["DETR"][f"val/{m}"] for m in METRICS]
        lines.append("| UP-DETR − DETR | | " + " | ".join(_fmt_gap(d) for d in delta) + " |")
    points = {name: eval_points(read_history(d)) for name, d in arms.items()}
    epochs = [r["epoch"] + 1 for r in next(iter(points.values()))]
    lines += ["", "AP at each evaluation point (epoch):", "",
              "| Model | " + " | ".join(str(e) for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    for name, recs in points.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r["val/AP"]) for r in recs) + " |")
    return "\n".join(lines)


def convergence_plot(arms: dict[str, Path], path: Path, metric: str = "AP") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, run_dir in arms.items():
        recs = eval_points(read_history(run_dir))
        ax.plot([r["epoch"] + 1 for r in recs], [r[f"val/{metric}"] for r in recs], marker="o", label=name)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel(f"val {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _grid(rows: list[list[Image.Image]], pad: int = 4) -> Image.Image:
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    sheet = Image.new("RGB", (len(rows[0]) * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    return sheet


@torch.inference_mode()
def detection_sheet(arms: dict[str, Path], val_images: list[Path], path: Path, device: str = "cpu",
                    threshold: float = 0.5, upscale: int = 2) -> None:
    """Rows = images; columns = each arm's detections above ``threshold``."""
    columns = []
    for run_dir in arms.values():
        loaded = load_trained(run_dir / "checkpoint.pth", device, tasks=("detection",))
        dataset = ImageFolder([str(p) for p in val_images], transforms=build_transforms(loaded.config.data, train=False))
        column = []
        for i in range(len(dataset)):
            pixels, info = dataset[i]
            det = postprocess_detections(loaded.model(ImageBatch.from_tensors([pixels]).to(device)), info["orig_size"].view(1, 2))[0]
            keep = det["scores"] >= threshold
            image = load_image(info["path"])
            big = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
            names = [loaded.classes[int(lab)] for lab in det["labels"][keep]]
            column.append(draw_detections(big, det["boxes_xyxy"][keep].cpu() * upscale, names, det["scores"][keep].cpu(),
                                          color_ids=[int(lab) for lab in det["labels"][keep]]))
        columns.append(column)
    save_image(_grid([list(row) for row in zip(*columns)]), path)


@torch.inference_mode()
def query_sheet(pretrained: Path, images: list[Path], path: Path, device: str = "cpu", seed: int = 0,
                upscale: int = 2) -> tuple[int, int]:
    """Random query patches of each image (as in pre-training) and where the model finds them.

    Returns ``(hits, patches)``: how many of the drawn patches are found at IoU ≥ 0.5.
    """
    loaded = load_trained(pretrained, device, tasks=("pretrain",))
    rng = np.random.default_rng(seed)
    m, q, min_side = loaded.model.num_patches, loaded.config.pretrain.query_size, loaded.config.pretrain.min_patch_size
    row, hits, total = [], 0, 0
    for p in images:
        image = load_image(p)
        boxes = sample_patch_boxes(image.height, image.width, m, min_side, rng,
                                   loaded.config.pretrain.max_patch_size).float()  # (M, 4) xyxy px
        patches = torch.stack([crop_patch(image, (x0, y0, x1 - x0, y1 - y0), q, str(p), min_side) for x0, y0, x1, y1 in boxes.tolist()])
        found = query_image(loaded, image, patches, device)
        pred = torch.tensor([b for b, _ in found])
        ious = box_iou(pred, boxes).diagonal()
        hits += int((ious >= 0.5).sum())
        total += len(ious)
        big = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
        drawn = draw_detections(big, boxes * upscale, [f"patch {i}" for i in range(m)], width=1)
        drawn = draw_detections(drawn, pred * upscale, [f"found {i} IoU {v:.2f}" for i, v in enumerate(ious.tolist())], width=3)
        row.append(drawn)
    save_image(_grid([row[i:i + 3] for i in range(0, len(row), 3)] if len(row) >= 3 else [row]), path)
    return hits, total


# photographs bundled with scikit-image / scikit-learn / matplotlib, shown whole (the benchmark cuts objects or
# backgrounds out of them): does a query patch cut from a real photograph lead back to its place?
PHOTOGRAPHS = ("skimage:astronaut", "skimage:coffee", "skimage:chelsea", "skimage:rocket", "skimage:camera",
               "sklearn:china.jpg", "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg", "skimage:coins",
               "skimage:immunohistochemistry", "skimage:hubble_deep_field", "skimage:colorwheel")


def photographs(longer_side: int = 256) -> list[tuple[str, Image.Image]]:
    """``(name, RGB image)`` of each of the bundled :data:`PHOTOGRAPHS`, longer side ``longer_side``."""
    out = []
    for spec in PHOTOGRAPHS:
        array = bundled_picture(spec)
        array = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array[..., :3]
        image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
        scale = longer_side / max(image.size)
        if scale != 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        out.append((spec.split(":")[1].split(".")[0], image))
    return out


def write_photographs(folder: Path, longer_side: int = 256) -> list[Path]:
    """The bundled :data:`PHOTOGRAPHS` as RGB JPEGs in ``folder``, longer side ``longer_side`` (the benchmark's scale)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in photographs(longer_side):
        path = folder / f"{name}.jpg"
        image.save(path, quality=95)
        paths.append(path)
    return paths


def oneshot_table(runs: dict[str, Path]) -> str:
    """Markdown: one-shot AP50 on seen / unseen classes of each run at each of its evaluation epochs."""
    points = {name: [r for r in read_history(d) if "val/AP50_seen" in r] for name, d in runs.items()}
    epochs = sorted({r["epoch"] for pts in points.values() for r in pts})
    lines = ["| Model | " + " | ".join(str(e + 1) for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    for name, pts in points.items():
        by_epoch = {r["epoch"]: r for r in pts}
        cells = [f"{_fmt(by_epoch[e]['val/AP50_seen'])} / {_fmt(by_epoch[e]['val/AP50_unseen'])}" if e in by_epoch else "–"
                 for e in epochs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_demo_report(report_dir: Path, arms: dict[str, Path], pretrained: Path, data_dir: Path, device: str = "cpu",
                      oneshot: dict[str, Path] | None = None) -> str:
    """Write ``report.md``, ``convergence.png``, ``detections.png``, ``query_patches.png``, ``results.json``
    (and the one-shot table when ``oneshot`` names the one-shot runs)."""
    dev = str(resolve_device(device))
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(arms)
    convergence_plot(arms, report_dir / "convergence.png")
    val = sorted((Path(data_dir) / "val").glob("*.jpg"))[:4]
    detection_sheet(arms, val, report_dir / "detections.png", device=dev)
    unlabeled = sorted((Path(data_dir) / "unlabeled").glob("*.jpg"))[:6]
    sheet_hits, sheet_patches = query_sheet(pretrained, unlabeled, report_dir / "query_patches.png", device=dev)
    photos = write_photographs(report_dir / "photographs")
    photo_hits, photo_patches = query_sheet(pretrained, photos, report_dir / "query_photographs.png", device=dev)
    # the pre-training run's own measurement (its evaluation images) is the hit rate; the sheet's few patches
    # are an illustration
    pretext = [r["val/hit_rate"] for r in read_history(Path(pretrained).parent) if "val/hit_rate" in r]
    hit_rate = pretext[-1] if pretext else None
    results = {name: eval_points(read_history(d)) for name, d in arms.items()}
    summary: dict = {"runs": {k: str(v) for k, v in arms.items()}, "pretrain_run": str(Path(pretrained).parent),
                     "eval_points": results, "query_hit_rate": hit_rate,
                     "query_sheet_hits": [sheet_hits, sheet_patches],
                     "query_photograph_hits": [photo_hits, photo_patches]}
    if oneshot:
        summary["oneshot"] = {name: {"run": str(d), "eval_points": [
            {k: r[k] for k in ("epoch", "val/AP50_seen", "val/AP50_unseen")}
            for r in read_history(d) if "val/AP50_seen" in r]} for name, d in oneshot.items()}
    (report_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    pretext_line = (f"Pre-trained model's query-patch hit rate (IoU ≥ 0.5) at the end of pre-training: {hit_rate:.1f}% "
                    if hit_rate is not None else "Pre-trained model's query-patch hit rate: not measured by its run; ")
    pretext_line += f"({sheet_hits} of the {sheet_patches} patches drawn below)."
    text = ["# UP-DETR vs DETR on the embedded benchmark", "", "Generated by `updetr demo` from the runs' metrics logs.", "",
            table, "", pretext_line, "",
            "![convergence](convergence.png)", "", "Detections (columns: " + ", ".join(arms) + "):", "",
            "![detections](detections.png)", "", "Query patches (thin: where each patch was cut; thick: where the pre-trained model finds it):",
            "", "![query patches](query_patches.png)", "",
            f"The same on whole photographs the pre-training never saw ({len(photos)} pictures bundled with "
            f"scikit-image, scikit-learn and matplotlib, longer side 256 px): {photo_hits} of {photo_patches} random "
            f"query patches found at IoU ≥ 0.5 ({100 * photo_hits / max(1, photo_patches):.0f} %).", "",
            "![query patches on photographs](query_photographs.png)", ""]
    if oneshot:
        text += ["One-shot detection (AP50 on seen / unseen classes at each evaluation epoch; a query patch of a class "
                 "from another image, find every object of that class; unseen classes never trained on):", "",
                 oneshot_table(oneshot), ""]
    (report_dir / "report.md").write_text("\n".join(text))
    return table
