"""``updetr demo``: the paper's headline comparison, UP-DETR vs DETR, on the embedded benchmark.

Stages (each cached under ``OUT/stages/<name>-<hash of its config>``, so a re-run with the
same configuration reuses it):

1. the embedded benchmark (``updetr data embedded``);
2. the CNN both arms start from: a ResNet-18 pre-trained on classification of objects
   rendered from material the benchmark never uses, then on naming the object at every place
   of scenes composed from that material (:mod:`updetr.backbone_pretrain`);
3. UP-DETR pre-training on the unlabelled split (frozen CNN, M query patches, attention
   mask, feature reconstruction);
4. fine-tuning from it, and DETR from the same CNN, same schedule, seed and budget;
5. COCO AP of both at several points of the schedule.

Then ``OUT/report/`` gets ``report.md`` (the table), ``convergence.png``,
``detections.png`` and ``query_patches.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, make_config
from .data.embedded import DEFAULT_MAX_OBJECTS, DEFAULT_OBJECT_SIZE

log = logging.getLogger(__name__)


@dataclass
class DemoBudget:
    """Sizes and schedules of one demo run; ``quick`` shrinks everything to seconds."""

    num_train: int = 800
    num_val: int = 200
    num_unlabeled: int = 1600
    image_size: tuple[int, int] = (128, 192)
    # object sides as fractions of the image's shorter side, and the most objects per image: fewer and larger
    # than the benchmark's defaults (DEFAULT_OBJECT_SIZE, DEFAULT_MAX_OBJECTS), whose 12-pixel objects a
    # stride-32 map of a 128-pixel image cannot resolve within a CPU budget
    object_size: tuple[float, float] = (0.2, 0.5)
    max_objects: int = 3
    # the CNN stage: 32-pixel crops (objects of 10-27 px, the benchmark's typical size) train a
    # ResNet-18 several times faster than 64-pixel ones; measured held-out accuracy 50-57 % in ~100 s
    # on 2 cores, against 17 % for 64-pixel crops in the same time
    cnn_images: int = 12000
    cnn_epochs: int = 5
    cnn_size: int = 32
    cnn_batch: int = 128
    cnn_lr: float = 3e-3
    # then the scene phase (backbone_pretrain._scene_phase): the classifier keeps training on reserved scenes to
    # name the object at every stride-8 cell, so that a frozen CNN's features inside a scene say what is there
    # (a classifier of isolated crops does not: class probe at objects' centre cells 20 % -> 67 % on seed 1)
    cnn_scene_steps: int = 150
    cnn_scene_size: int = 128
    # weight of the crop-context loss (below) added to the scene phase's steps; it trades the scene features'
    # class content for query patches that find their place (see README, "What we found")
    cnn_scene_context_weight: float = 0.0
    # then the crop-context phase (backbone_pretrain.crop_context_loss): resized crops of reserved scenes must
    # point back to their place in the scene's own features, as the paper's SwAV CNN does for query patches
    cnn_context_steps: int = 0
    # both arms and the pre-training keep the CNN frozen, so its features are computed once per
    # image (data.cache_features): ~4x faster fine-tuning steps, ~2x pre-training steps
    cache_features: bool = True
    # with the cached CNN features these fill the 10 minutes: ~22 s per pre-training epoch and ~4 s per
    # fine-tuning epoch (10 queries) on 2 cores, after ~3 min for the CNN stage
    pretrain_epochs: int = 5
    finetune_epochs: int = 21
    # optional stages 6-7: one-shot detection (seen / unseen classes) trained this many epochs from scratch and from
    # the pre-training, ~65 s per 7 epochs and arm with cached features; 0 = off (it does not fit the 10 minutes)
    oneshot_epochs: int = 0
    eval_points: int = 3
    seed: int = 0
    # overrides on top of the ``embedded`` presets: 10 queries for at most 3 objects (30 queries start slower: the
    # duplicates of one image outrank the true positives of the next until the ranking is learned)
    model: list[str] = field(default_factory=lambda: ["model.num_queries=10"])
    finetune: list[str] = field(default_factory=list)
    # pre-training matches each query group to its own patch (pretrain.group_matching): over all queries the
    # decoder can lower the loss by spreading boxes without looking at the patches (pretext hit rate 13 % -> 22 %,
    # UP-DETR AP 0.9 -> 1.1 and 1.3 -> 2.2 on seeds 1 and 2)
    pretrain: list[str] = field(default_factory=lambda: ["pretrain.group_matching=true"])

    @classmethod
    def quick(cls) -> "DemoBudget":
        return cls(num_train=16, num_val=8, num_unlabeled=16, image_size=(64, 96), cnn_images=256, cnn_epochs=1,
                   cnn_scene_steps=2, cnn_scene_size=64,
                   pretrain_epochs=1, finetune_epochs=2, eval_points=2, model=[
                       "model.backbone=resnet18", "model.hidden_dim=32", "model.num_heads=4", "model.enc_layers=1",
                       "model.dec_layers=2", "model.ffn_dim=64", "model.num_queries=8", "model.dropout=0.0",
                       "model.pre_norm=true", "pretrain.num_patches=2", "pretrain.query_size=32",
                       "data.scales=[64,80]", "data.max_size=128", "data.crop_resize=[64]", "data.crop_size=[48,64]",
                       "data.val_size=64", "data.batch_size=4", "data.num_workers=0"])


_LIST_FIELDS = ("model", "finetune", "pretrain")


def apply_budget_overrides(budget: DemoBudget, items: list[str]) -> DemoBudget:
    """``FIELD=VALUE`` items (``--budget`` on the command line) applied to a copy of ``budget``.

    ``model`` / ``finetune`` / ``pretrain`` take a config override and append it (for example
    ``finetune=optim.lr=5e-4``); every other field takes a JSON value (``finetune_epochs=12``,
    ``image_size=[96,128]``).
    """
    from dataclasses import fields, replace

    from .config import ConfigError

    known = {f.name: f for f in fields(DemoBudget)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ConfigError(f"--budget {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(known)}")
        if key in _LIST_FIELDS:
            changes[key] = list(changes.get(key, getattr(budget, key))) + [raw]
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise ConfigError(f"--budget {item!r}: {raw!r} is not a JSON value") from None
        current = getattr(budget, key)
        if isinstance(current, tuple):
            if not (isinstance(value, list) and len(value) == len(current)):
                raise ConfigError(f"--budget {key} needs a list of {len(current)} numbers, got {raw}")
            value = tuple(value)
        elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not type(current):
            raise ConfigError(f"--budget {key} must be {type(current).__name__}, got {raw}")
        changes[key] = value
    return replace(budget, **changes)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _stage_dir(root: Path, name: str, key: Any) -> Path:
    return root / "stages" / f"{name}-{_digest(key)}"


def _done(path: Path) -> bool:
    return (path / "DONE").is_file()


def _mark_done(path: Path, info: dict) -> None:
    (path / "DONE").write_text(json.dumps(info, indent=2, default=str) + "\n")


def _run_fit(task_cls, cfg: Config, progress: bool) -> dict:
    from .engine.distributed import init_distributed
    from .engine.loop import fit

    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)  # a stage interrupted earlier: start it again cleanly
    result = fit(task_cls(cfg), cfg, init_distributed(cfg.device), progress=progress)
    return {"history": result.history, "final": result.final_metrics}


@dataclass
class DemoResult:
    report_dir: Path
    table: str
    detr_history: list[dict]
    updetr_history: list[dict]
    seconds: float


def cnn_stage_key(budget: DemoBudget) -> dict[str, Any]:
    """What the CNN stage depends on (its cache folder is named after it)."""
    key: dict[str, Any] = dict(images=budget.cnn_images, epochs=budget.cnn_epochs, seed=budget.seed,
                               size=budget.cnn_size, batch=budget.cnn_batch, lr=budget.cnn_lr)
    if budget.cnn_context_steps:  # keyed only when used, so existing caches stay valid
        key["context_steps"] = budget.cnn_context_steps
    if budget.cnn_scene_steps:  # the scenes are drawn like the benchmark's objects
        key.update(scene_steps=budget.cnn_scene_steps, scene_size=budget.cnn_scene_size,
                   object_size=list(budget.object_size), max_objects=budget.max_objects)
        if budget.cnn_scene_context_weight:
            key["scene_context_weight"] = budget.cnn_scene_context_weight
    return key


def prepare_inputs(root: Path, budget: DemoBudget, device: str = "auto", progress: bool = True) -> tuple[Path, Path]:
    """Stages 1–2 (cached): the embedded benchmark and the CNN both arms start from."""
    from .backbone_pretrain import pretrain_backbone
    from .data.embedded import generate_embedded

    # 1. benchmark
    data_key = dict(seed=budget.seed, num_train=budget.num_train, num_val=budget.num_val,
                    num_unlabeled=budget.num_unlabeled, image_size=list(budget.image_size),
                    object_size=list(budget.object_size))
    if budget.max_objects != DEFAULT_MAX_OBJECTS:  # keyed only when changed, so existing caches stay valid
        data_key["max_objects"] = budget.max_objects
    data_dir = _stage_dir(root, "data", data_key)
    _stage_banner(1, "embedded benchmark", data_dir)
    generate_embedded(data_dir, seed=budget.seed, num_train=budget.num_train, num_val=budget.num_val,
                      num_unlabeled=budget.num_unlabeled, image_size=budget.image_size,
                      object_size=budget.object_size, max_objects=budget.max_objects, progress=progress)

    # 2. CNN
    cnn_dir = _stage_dir(root, "cnn", cnn_stage_key(budget))
    _stage_banner(2, "CNN pre-training (no benchmark images, no detection labels)", cnn_dir)
    if not _done(cnn_dir):
        cnn_dir.mkdir(parents=True, exist_ok=True)
        summary = pretrain_backbone(cnn_dir / "resnet18.pth", num_images=budget.cnn_images, epochs=budget.cnn_epochs,
                                    size=budget.cnn_size, batch_size=budget.cnn_batch, lr=budget.cnn_lr,
                                    seed=budget.seed, device=_cnn_device(device), progress=progress,
                                    scene_steps=budget.cnn_scene_steps, scene_size=budget.cnn_scene_size,
                                    scene_object_size=budget.object_size, scene_max_objects=budget.max_objects,
                                    scene_context_weight=budget.cnn_scene_context_weight,
                                    context_steps=budget.cnn_context_steps)
        _mark_done(cnn_dir, summary)
    return data_dir, cnn_dir / "resnet18.pth"


def common_overrides(data_dir: Path, cnn_weights: Path, seed: int, device: str) -> list[str]:
    """The data, CNN, seed and device settings every training stage of one seed shares."""
    from .data.embedded import embedded_data_overrides

    return embedded_data_overrides(data_dir) + [
        f"model.backbone_weights={json.dumps(str(cnn_weights))}", f"seed={seed}", f"device={json.dumps(device)}"]


def _cached(cfg: Config, budget: DemoBudget, frozen: bool) -> Config:
    """``data.cache_features`` on where the budget asks for it and the stage's CNN is frozen."""
    return cfg.override(["data.cache_features=true"]) if budget.cache_features and frozen else cfg


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
    return _cached(cfg, budget, cfg.optim.lr_backbone == 0)


def run_demo(output: str | Path = "demo", *, quick: bool = False, device: str = "auto", progress: bool = True,
             budget: DemoBudget | None = None) -> DemoResult:
    from .engine.detection import DetectionTask
    from .engine.pretrain import PretrainTask

    start = time.perf_counter()
    budget = budget or (DemoBudget.quick() if quick else DemoBudget())
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)

    data_dir, cnn_weights = prepare_inputs(root, budget, device, progress)

    common = common_overrides(data_dir, cnn_weights, budget.seed, device)

    total = 7 if budget.oneshot_epochs > 0 else 5  # stages, for the progress lines

    # 3. UP-DETR pre-training
    pre_cfg = pretrain_config(budget, common, budget.pretrain_epochs)
    pretrained = _run_stage(root, "pretrain", PretrainTask, pre_cfg, progress,
                            (3, total, "UP-DETR pre-training on the unlabelled split")) / "checkpoint.pth"

    # 4-5. fine-tuning vs DETR, same CNN, schedule, seed
    arms = {}
    for index, (arm, init) in enumerate((("DETR", ""), ("UP-DETR", str(pretrained))), 4):
        cfg = finetune_config(budget, common, budget.finetune_epochs, init)
        arms[arm] = _run_stage(root, arm.lower().replace("-", ""), DetectionTask, cfg, progress,
                               (index, total, f"{arm}: fine-tuning on the labelled split"))

    # 6-7. optional: one-shot detection from scratch vs from the pre-training, the same recipe and evaluation points
    oneshot = {}
    if budget.oneshot_epochs > 0:
        from .engine.one_shot import OneShotTask

        for index, (arm, init) in enumerate((("DETR", ""), ("UP-DETR", str(pretrained))), 6):
            cfg = finetune_config(budget, common, budget.oneshot_epochs, init)
            oneshot[arm] = _run_stage(root, "oneshot", OneShotTask, cfg, progress,
                                      (index, total, f"one-shot detection from {'scratch' if not init else 'UP-DETR'}"))

    from .report import write_demo_report

    report_dir = root / "report"
    table = write_demo_report(report_dir, arms, pretrained, data_dir, device=device, oneshot=oneshot or None)
    seconds = time.perf_counter() - start
    print(table)
    if oneshot:
        from .report import oneshot_table

        print("\nOne-shot detection, AP50 seen / unseen at each evaluation epoch:\n\n" + oneshot_table(oneshot))
    print(f"\nreport: {report_dir}  ({seconds / 60:.1f} min)")
    return DemoResult(report_dir, table, _history(arms["DETR"]), _history(arms["UP-DETR"]), seconds)


def _run_stage(root: Path, kind: str, task_cls, cfg: Config, progress: bool, banner: tuple[int, int, str]) -> Path:
    """The stage folder of ``cfg`` under ``root``, trained there with ``task_cls`` unless it is already done."""
    run_dir = _stage_dir(root, kind, cfg.to_dict())
    index, total, title = banner
    _stage_banner(index, title, run_dir, total)
    if not _done(run_dir):
        info = _run_fit(task_cls, cfg.override([f"output_dir={json.dumps(str(run_dir))}"]), progress)
        _mark_done(run_dir, info["final"])
    return run_dir


def _cnn_device(device: str) -> str:
    from .engine.distributed import resolve_device

    return str(resolve_device(device))


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _stage_banner(index: int, title: str, path: Path, total: int = 5) -> None:
    state = "cached" if _done(path) or (path / "meta.json").is_file() else "running"
    log.info("[%d/%d] %s (%s: %s)", index, total, title, state, path)
