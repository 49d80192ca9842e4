"""Pre-training data speed: the paper's PIL pipeline vs ``updetr.data.unlabeled``.

    python benchmarks/pretrain_data.py [--seconds 20] [--rounds 5] [--threads 1] [--num-patches 10]

Both pipelines read the photographs bundled with scikit-image (those that load offline),
saved as JPEG (quality 90) into a temporary folder, and produce the same thing per sample:
the image resized (shortest side from the paper's scales, longest <= 600) and normalised,
plus M = 10 query patches of 128 x 128, augmented and normalised.

One process, ``torch.set_num_threads(threads)``. Rates are samples per CPU-second of this
process (``time.process_time``), i.e. per core, so other processes on the machine do not
inflate them; wall-clock rates are printed too. The pipelines run in alternating rounds and
each keeps its best round, so what load remains (shared caches) affects both alike.

(a) ``paper``: a re-creation of the authors' ``datasets/selfdet.py`` (docs/method.md §1): PIL image,
    ``np.random`` patch boxes, PIL crop, then per patch ``Compose([Resize((128, 128)),
    RandomApply([ColorJitter(.4, .4, .4, .1)], p=.8), RandomGrayscale(.2),
    RandomApply([GaussianBlur], p=.5), ToTensor(), Normalize])`` with PIL's Gaussian blur
    (sigma ~ U[0.1, 2]); the image through DETR's ``RandomResize(scales, max_size=600)``
    (PIL resize), ``ToTensor`` and ``Normalize``.
(b) ``updetr``: ``UnlabeledImages`` (same sampling and augmentation distribution).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from updetr.data.unlabeled import UnlabeledImages

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PAPER_SCALES = [320, 336, 352, 368, 400, 416, 432, 448, 464, 480]  # the code's list (no 384)

# scikit-image sample images that need no download (skimage.data with pooch absent).
SKIMAGE_PHOTOS = [
    "astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
    "moon", "page", "retina", "rocket", "stereo_motorcycle", "text",
]


def save_skimage_photos(folder: Path) -> list[Path]:
    """Write the bundled scikit-image photographs as JPEG files; returns their paths."""
    import skimage.data

    paths = []
    for name in SKIMAGE_PHOTOS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download is simply left out
            continue
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
            pixels = pixels[0]
        image = Image.fromarray(pixels)
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        path = folder / f"{name}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


class _PILGaussianBlur:
    """The paper's SimCLR-style blur: PIL ``GaussianBlur(radius=sigma)``, sigma ~ U[0.1, 2]."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class PaperPipeline:
    """The authors' pre-training data path, from the description in docs/method.md §1."""

    def __init__(self, files: list[Path], num_patches: int = 10, max_size: int = 600) -> None:
        self.files = files
        self.num_patches = num_patches
        self.max_size = max_size
        self.patch_transform = T.Compose([
            T.Resize((128, 128)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([_PILGaussianBlur()], p=0.5),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        image = Image.open(self.files[index]).convert("RGB")
        w, h = image.size
        boxes, patches = [], []
        for _ in range(self.num_patches):
            sw, sh = np.random.randint(8, w - 8 + 1), np.random.randint(8, h - 8 + 1)
            x, y = np.random.randint(w - sw), np.random.randint(h - sh)
            boxes.append([x, y, x + sw, y + sh])
            patches.append(self.patch_transform(image.crop((x, y, x + sw, y + sh))))
        size = _detr_size((w, h), random.choice(PAPER_SCALES), self.max_size)  # (oh, ow)
        image = TF.resize(image, list(size))
        boxes_px = torch.tensor(boxes, dtype=torch.float32) * torch.tensor(
            [size[1] / w, size[0] / h, size[1] / w, size[0] / h])
        image = TF.normalize(TF.to_tensor(image), MEAN, STD)
        x0, y0, x1, y1 = boxes_px.unbind(-1)
        cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
        target = {"boxes_cxcywh": cxcywh / torch.tensor([size[1], size[0], size[1], size[0]]),
                  "labels": torch.ones(len(boxes), dtype=torch.int64)}
        return image, target, torch.stack(patches)


def _detr_size(image_size: tuple[int, int], size: int, max_size: int) -> tuple[int, int]:
    """DETR's ``get_size_with_aspect_ratio``: (height, width)."""
    w, h = image_size
    min_side, max_side = float(min(w, h)), float(max(w, h))
    if max_side / min_side * size > max_size:
        size = int(round(max_size * min_side / max_side))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _round(dataset, start: int, seconds: float) -> tuple[int, float, float]:
    """Produce samples for about ``seconds`` of CPU time; returns (samples, CPU s, wall s).

    CPU time of this process (all its threads): samples per CPU-second is the per-core rate,
    and it stays meaningful when other processes share the machine.
    """
    n, begin, wall = 0, time.process_time(), time.perf_counter()
    while True:
        dataset[(start + n) % len(dataset)]
        n += 1
        elapsed = time.process_time() - begin
        if elapsed >= seconds:
            return n, elapsed, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per pipeline (all rounds)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the best one is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = per-core numbers)")
    parser.add_argument("--num-patches", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="updetr-bench-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        files = save_skimage_photos(folder)
        pipelines = {
            "paper (PIL, per-patch torchvision transforms)": PaperPipeline(files, args.num_patches),
            "updetr UnlabeledImages": UnlabeledImages(folder, num_patches=args.num_patches,
                                                      cache_dir=Path(tmp) / "cache"),
        }
        for dataset in pipelines.values():  # warm-up: imports, allocator, file cache
            _round(dataset, 0, 1.0)
        best = dict.fromkeys(pipelines, 0.0)
        best_wall = dict.fromkeys(pipelines, 0.0)
        per_round = args.seconds / args.rounds
        for r in range(args.rounds):
            for name, dataset in pipelines.items():
                n, cpu, wall = _round(dataset, r * 7, per_round)
                best[name] = max(best[name], n / cpu)
                best_wall[name] = max(best_wall[name], n / wall)
        sizes = [Image.open(p).size for p in files]

    mean_pixels = np.mean([w * h for w, h in sizes])
    print(f"{len(files)} scikit-image photographs as JPEG (mean {mean_pixels / 1e3:.0f} kpixels), "
          f"M={args.num_patches} patches of 128x128, torch threads={args.threads}, "
          f"best of {args.rounds} alternating rounds of {per_round:.1f} CPU-s; load average {os.getloadavg()[0]:.1f}\n")
    baseline = best[next(iter(pipelines))]
    baseline_wall = best_wall[next(iter(pipelines))]
    print("| pipeline | samples per CPU-second (per core) | vs paper | samples/s wall clock | vs paper |")
    print("|---|---:|---:|---:|---:|")
    for name, rate in best.items():
        wall = best_wall[name]
        print(f"| {name} | {rate:.1f} | {rate / baseline:.2f}x | {wall:.1f} | {wall / baseline_wall:.2f}x |")


if __name__ == "__main__":
    main()
