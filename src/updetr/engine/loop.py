"""The training loop: one plain function per epoch, and ``fit`` around it.

Everything task-specific (datasets, model, criterion, how a batch is fed, how the
model is evaluated) comes from a :class:`Task`; the loop is the same for DETR
detection, UP-DETR pre-training, one-shot detection and panoptic segmentation.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..config import Config
from ..data.io import DataError, find_unusable_images
from ..structures import DetectionOutput
from .checkpoint import CheckpointError, first_line, load_state_dict_strict, rng_state, set_rng_state
from .distributed import DistInfo, all_reduce_mean, any_across_processes, barrier, gather_lists
from .run_folder import ResumePlan, RunFolder, RunFolderError, json_safe

log = logging.getLogger(__name__)


class Task(Protocol):
    """One training task: everything ``fit`` and the checkpoint loader need, the same parts for every task.

    The tasks (:data:`updetr.engine.tasks.TASKS`): detection, pretrain, oneshot, panoptic. A task is built from
    a :class:`Config` alone (``TaskClass(cfg)``); its settings are sections of that config.
    """

    name: str  # stored in checkpoints as "task" ("detection", "pretrain", "oneshot", "panoptic")
    primary_metric: str  # the metric that picks ``best.pth`` (higher is better)
    classes: list[str]  # class names, known once a dataset is built or ``restore`` has read a checkpoint
    category_ids: list[int]  # the dataset's category id of each class (COCO JSON ids)

    def train_dataset(self) -> Dataset:
        """The training split, augmented (the eval transform when ``data.cache_features``: flips come from the cache)."""

    def val_dataset(self) -> Dataset | None:
        """What ``fit`` evaluates on after an epoch: ``eval_dataset("val")``, built once."""

    def eval_dataset(self, split: str) -> Dataset:
        """A split at the eval transform, as evaluation reads it (checkpoint evaluation uses this too)."""

    def collate(self, batch: list) -> Any:
        """Samples -> a batch (pixels padded to ``data.size_divisibility``, or cached feature maps)."""

    def cache_features(self, model: nn.Module, device: torch.device, progress: bool = True) -> tuple[Dataset, Dataset | None]:
        """(train, val) datasets whose frozen-CNN maps are computed once (``data.cache_features``)."""

    def build_architecture(self) -> nn.Module:
        """The task's model with fresh weights (the loader fills them from a checkpoint)."""

    def build_model(self) -> nn.Module:
        """``build_architecture`` plus the weights of ``cfg.init_from`` by the task's transfer rules."""

    def build_criterion(self) -> nn.Module:
        """The loss: Hungarian matching and the weighted terms of ``cfg.loss``."""

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[DetectionOutput, list[dict]]:
        """(model output, targets on ``device``) of one batch."""

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, progress: bool) -> dict[str, float]:
        """The task's metrics on ``loader`` (percent)."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint stores beside the weights and the config (classes, categories, one-shot split)."""

    def restore(self, ckpt: dict[str, Any], source: str) -> None:
        """Read ``checkpoint_extra``'s entries back from a checkpoint (``source`` names it in errors)."""


def build_optimizer(model: nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """AdamW with a separate backbone learning rate and a step decay (×0.1 after ``lr_drop`` epochs)."""
    prefixes = ("backbone.", "detr.backbone.")  # DETR, and DETR wrapped by the segmentation head
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefixes)]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(prefixes)]
    groups = [{"params": rest, "lr": cfg.optim.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.optim.lr_backbone})
    # the fused kernel updates all tensors in one pass (measured 8 ms vs 45 ms per step for
    # the small recipe on CPU); torch builds without it fall back to the for-loop version
    try:
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.optim.lr_drop), gamma=0.1)
    return optimizer, scheduler


def autocast_context(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA; on CPU mixed precision stays off (no native bf16 here)."""
    if amp == "none":
        return nullcontext()
    if device.type != "cuda":
        raise ValueError(f"optim.amp={amp} is for CUDA; on {device.type} keep optim.amp=none")
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _to_float(loss_dict: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in loss_dict.items() if v.numel() == 1}


class NonFiniteLossError(FloatingPointError):
    """The model output, the loss or the gradient norm of a training step is NaN or infinite; no
    weight was changed."""

    def __init__(self, what: str, value: float, epoch: int, step: int, global_step: int, losses: dict[str, float]):
        self.what, self.value, self.epoch, self.step, self.global_step = what, value, epoch, step, global_step
        shown = "; " + ", ".join(f"{k}={v:.4g}" for k, v in losses.items() if k.startswith("loss")) if losses else ""
        value_text = "not finite" if math.isnan(value) and what.startswith("model output") else str(value)
        super().__init__(f"the {what} is {value_text} at epoch {epoch} step {step} (global step {global_step}{shown})")


def optimizer_step(loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, clip_max_norm: float,
                   scaler: torch.amp.GradScaler | None = None) -> float | None:
    """Backward, gradient clipping (``clip_max_norm`` > 0) and the optimizer step; fp16 goes through ``scaler``.

    Returns the gradient norm when it is not finite and no step was taken (None otherwise): with
    clipping on, a NaN or infinite gradient never reaches the weights. fp16's ``scaler`` skips
    such steps itself (its loss scale backs off), so they are not reported.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        if scaler is None and not torch.isfinite(norm):  # DDP averaged the gradients: every process agrees
            optimizer.zero_grad(set_to_none=True)
            return float(norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return None


def train_one_epoch(
    task: Task,
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    *,
    clip_max_norm: float = 0.1,
    amp: str = "none",
    max_steps: int = 0,
    progress: bool = True,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of every scalar loss term (this process).

    Raises:
        NonFiniteLossError: a step's loss (or, with clipping, its gradient norm) is NaN or
            infinite, in any process; that step changed no weight.
    """
    model.train()
    criterion.train()
    totals: dict[str, float] = {}
    steps, images, start = 0, 0, time.perf_counter()
    total = len(loader) if not max_steps else min(max_steps, len(loader))
    bar = tqdm(total=total, desc=f"epoch {epoch}", disable=not progress, leave=False, dynamic_ncols=True)
    for batch in loader:
        if max_steps and steps >= max_steps:
            break
        try:
            values, n_images = _train_step(task, model, criterion, batch, optimizer, device, amp, clip_max_norm,
                                           scaler, epoch, steps, epoch * total + steps)
        except NonFiniteLossError:
            bar.close()
            raise
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + v
        steps += 1
        images += n_images
        rate = images / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{rate:.1f}")
        bar.update()
        if on_step is not None:
            on_step(steps, values)
    bar.close()
    out = {k: v / max(steps, 1) for k, v in totals.items()}
    out["images_per_s"] = images / max(time.perf_counter() - start, 1e-9)
    out["steps"] = steps
    return out


def _train_step(task: Task, model: nn.Module, criterion: nn.Module, batch: Any, optimizer: torch.optim.Optimizer,
                device: torch.device, amp: str, clip_max_norm: float, scaler: torch.amp.GradScaler | None,
                epoch: int, step: int, global_step: int) -> tuple[dict[str, float], int]:
    """One optimizer step on ``batch``: forward (under ``amp``), loss in fp32, backward and update.

    Returns (the scalar loss terms, the number of images). Raises NonFiniteLossError, in every
    process alike, when the model output, the loss or the clipped gradient norm is not finite;
    no weight was changed then.
    """
    with autocast_context(device, amp):
        output, targets = task.forward(model, batch, device)
    output = _float_output(output)
    bad = not _finite(output)  # the matcher would fail on it; every process stops together
    if any_across_processes(bad, device):
        raise NonFiniteLossError("model output" if bad else "model output of another process", float("nan"),
                                 epoch, step, global_step, {})
    loss_dict = criterion(output, targets)
    loss = loss_dict["loss"]
    if any_across_processes(not bool(torch.isfinite(loss)), device):
        raise NonFiniteLossError("loss", float(loss.detach()), epoch, step, global_step, _to_float(loss_dict))
    bad_norm = optimizer_step(loss, model, optimizer, clip_max_norm, scaler)
    if bad_norm is not None:
        raise NonFiniteLossError("gradient norm", bad_norm, epoch, step, global_step, _to_float(loss_dict))
    return _to_float(loss_dict), len(targets)


def _finite(output: DetectionOutput) -> bool:
    """Whether the logits and boxes of every decoder layer are finite."""
    return all(bool(torch.isfinite(o.logits).all() and torch.isfinite(o.boxes_cxcywh).all()) for o in [output, *output.aux])


def _float_output(output: DetectionOutput) -> DetectionOutput:
    """Losses are computed in fp32 even under autocast."""
    if output.logits.dtype == torch.float32:
        return output
    cast = lambda t: t.float() if isinstance(t, Tensor) else t  # noqa: E731
    return DetectionOutput(
        logits=cast(output.logits), boxes_cxcywh=cast(output.boxes_cxcywh), aux=[_float_output(a) for a in output.aux],
        features=cast(output.features), patch_features=cast(output.patch_features), masks=cast(output.masks),
    )


@dataclass
class FitResult:
    output_dir: Path
    history: list[dict[str, Any]]
    best_metric: float | None
    final_metrics: dict[str, float]


def make_loader(dataset: Dataset, collate, batch_size: int, num_workers: int, dist_info: DistInfo, *, train: bool, seed: int) -> DataLoader:
    """Deterministic, distributed-aware loader: the shuffle order is a function of (seed, epoch).

    A dataset that says it is ``in_memory`` (cached features) is read in this process: worker
    processes would only add the cost of sending its tensors back.
    """
    if getattr(dataset, "in_memory", False):
        num_workers = 0
    sampler = DistributedSampler(
        dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=train, seed=seed, drop_last=False
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=train and len(dataset) >= batch_size * dist_info.world_size,
        persistent_workers=False,
        pin_memory=dist_info.device.type == "cuda",
    )


def fit(task: Task, cfg: Config, dist_info: DistInfo, *, resume: str | None = None, progress: bool = True) -> FitResult:
    """Train ``task`` for ``cfg.optim.epochs`` epochs with evaluation and checkpoints.

    ``cfg.output_dir`` is the run folder (``updetr.engine.run_folder``: ``config.json``,
    ``checkpoint.pth``, ``best.pth``, ``metrics.jsonl``, ``resumes.jsonl``). A fresh run needs an
    empty or absent folder. ``resume`` (a checkpoint file, or a run folder) continues exactly
    where a checkpoint stopped (model, optimizer, scheduler, epoch, RNG), after checking that the
    requested config changes nothing the run cannot honour; ``--resume FOLDER`` of a run that
    never finished an epoch starts it there. Every check (config, data, images, model,
    checkpoint) runs before the first write, and each epoch is committed by one atomic rename
    of ``checkpoint.pth``, which carries the metrics of every epoch so far: a kill at any
    instant leaves a folder that resumes with every epoch's record exactly once.

    The steps: check the folder (:meth:`RunFolder.plan_resume` or :meth:`RunFolder.check_fresh`, in every
    process), build and restore what trains (:func:`_prepare`), then the epochs (:func:`_train_epochs`).

    Raises:
        RunFolderError, CheckpointError, ConfigError, DataError: a start-up check failed (nothing
            was written) or a file could not be written (the previous epoch's files are intact).
        TrainingStopped: the loss, the model output or the gradient norm became NaN or infinite
            (before any weight changed); the last good checkpoint is kept.
    """
    folder = RunFolder(cfg.output_dir)
    plan = _agreed(lambda: folder.plan_resume(resume, cfg, task.name) if resume else folder.check_fresh(),
                   dist_info.device)
    torch.manual_seed(cfg.seed + dist_info.rank)
    run, standing = _prepare(task, cfg, dist_info, folder, plan, progress and dist_info.is_main)
    final = _train_epochs(run, standing)
    return FitResult(output_dir=folder.path, history=standing.history, best_metric=standing.best, final_metrics=final)


@dataclass
class _Run:
    """What every epoch of one ``fit`` uses, built (and restored on a resume) before the first epoch."""

    task: Task
    cfg: Config  # the requested config: the training settings
    run_cfg: Config  # the config the run records in its checkpoints (a resume's plan decides it)
    folder: RunFolder
    dist_info: DistInfo
    progress: bool  # progress bars (the main process only)
    train_set: Dataset
    model: nn.Module
    ddp_model: nn.Module  # ``model``, wrapped in DistributedDataParallel when training is distributed
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    scaler: torch.amp.GradScaler | None
    train_loader: DataLoader
    val_loader: DataLoader | None


@dataclass
class _Standing:
    """Where a run stands: the first epoch still to train, the best primary metric so far (and its
    epoch), and the record of every epoch done."""

    start_epoch: int = 0
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def update_best(self, metric: float | None, epoch: int) -> bool:
        """Take ``metric`` (None: not evaluated) of ``epoch`` as the best when it beats the best so far."""
        is_best = metric is not None and not math.isnan(metric) and (self.best is None or metric > self.best)
        if is_best:
            self.best, self.best_epoch = metric, epoch
        return is_best


def _prepare(task: Task, cfg: Config, dist_info: DistInfo, folder: RunFolder, plan: ResumePlan | None,
             progress: bool) -> tuple[_Run, _Standing]:
    """Build the data, model, loss and optimizer, restore a resume point, claim the folder, and make the
    loaders; the order (and so every random draw) is that of a run started by hand."""
    device = dist_info.device
    train_set = task.train_dataset()
    val_set = task.val_dataset()
    check_images([train_set, val_set], dist_info)
    model = task.build_model().to(device)
    if cfg.data.cache_features:
        train_set, val_set = task.cache_features(model, device, progress)
    criterion = task.build_criterion().to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if cfg.optim.amp == "fp16" else None

    standing = _Standing()
    if plan is not None and plan.checkpoint is not None:
        _restore(plan, task, model, optimizer, scheduler, cfg)
        standing = _Standing(plan.start_epoch, plan.best, plan.best_epoch, list(plan.history))
        log.info("resumed from %s at epoch %d", plan.source, standing.start_epoch)
    run_cfg = plan.config if plan is not None else cfg
    if dist_info.is_main:
        folder.claim(run_cfg, plan)
    barrier()

    def loader(dataset: Dataset, train: bool) -> DataLoader:
        return make_loader(dataset, task.collate, cfg.data.batch_size, cfg.data.num_workers, dist_info, train=train,
                           seed=cfg.seed)

    run = _Run(task=task, cfg=cfg, run_cfg=run_cfg, folder=folder, dist_info=dist_info, progress=progress,
               train_set=train_set, model=model, ddp_model=_distributed(model, dist_info), criterion=criterion,
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, train_loader=loader(train_set, True),
               val_loader=loader(val_set, False) if val_set is not None else None)
    return run, standing


def _distributed(model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when training is distributed, else ``model`` itself."""
    if not dist_info.enabled:
        return model
    device = dist_info.device
    ddp_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
    )
    log.info("DistributedDataParallel: %s backend, %d processes", torch.distributed.get_backend(), dist_info.world_size)
    return ddp_model


def _train_epochs(run: _Run, standing: _Standing) -> dict[str, float]:
    """Train the epochs from ``standing.start_epoch`` on, each committed to the folder; returns the last
    evaluation's metrics (empty when none ran). A NaN or infinite step becomes :class:`TrainingStopped`."""
    final: dict[str, float] = {}
    epochs = run.cfg.optim.epochs
    if standing.start_epoch >= epochs:
        log.info("%s: the run has finished all %d epochs already", run.folder.path, epochs)
    epoch = standing.start_epoch
    try:
        for epoch in range(standing.start_epoch, epochs):
            metrics = _one_epoch(run, standing, epoch)
            if metrics is not None:
                final = metrics
            barrier()
    except NonFiniteLossError as err:
        raise TrainingStopped(f"{run.task.name} run stopped: {err}; {_last_good(run.folder, epoch)}. Resume from it "
                              f"with a lower learning rate, e.g. --resume {run.folder.path} --set optim.lr=...") from None
    except KeyboardInterrupt:
        if run.dist_info.is_main:
            log.warning("interrupted during epoch %d; %s. Continue with --resume %s", epoch,
                        _last_good(run.folder, epoch), run.folder.path)
        raise
    return final


def _one_epoch(run: _Run, standing: _Standing, epoch: int) -> dict[str, float] | None:
    """Train ``epoch``, evaluate when due (``eval_every``, and always after the last epoch), add its record to
    ``standing`` and commit it (main process); returns the evaluation's metrics, None when none ran."""
    cfg, device = run.cfg, run.dist_info.device
    run.train_loader.sampler.set_epoch(epoch)
    if hasattr(run.train_set, "set_epoch"):
        run.train_set.set_epoch(epoch)
    train_stats = train_one_epoch(
        run.task, run.ddp_model, run.criterion, run.train_loader, run.optimizer, device, epoch,
        clip_max_norm=cfg.optim.clip_max_norm, amp=cfg.optim.amp, max_steps=cfg.max_steps_per_epoch,
        progress=run.progress, scaler=run.scaler,
    )
    run.scheduler.step()
    train_stats = all_reduce_mean(train_stats, device)
    record: dict[str, Any] = {"epoch": epoch, **{f"train/{k}": v for k, v in train_stats.items()}}
    metrics = None
    last = epoch == cfg.optim.epochs - 1
    if run.val_loader is not None and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
        metrics = run.task.evaluate(run.model, run.val_loader, device, run.progress)
        record.update({f"val/{k}": v for k, v in metrics.items()})
    record["lr"] = run.optimizer.param_groups[0]["lr"]
    standing.history.append(json_safe(record))
    is_best = standing.update_best(record.get(f"val/{run.task.primary_metric}"), epoch)
    if run.dist_info.is_main:
        run.folder.commit_epoch(_checkpoint(run, standing, record, epoch), record, is_best)
        shown = {k: v for k, v in record.items() if isinstance(v, float) and not k.startswith("train/loss_")}
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    return metrics


def _checkpoint(run: _Run, standing: _Standing, record: dict[str, Any], epoch: int) -> dict[str, Any]:
    """The contents of ``checkpoint.pth`` after ``epoch``: everything a resume needs, and every epoch's record."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.scheduler.state_dict(),
        "epoch": epoch,
        "config": run.run_cfg.to_dict(),
        "rng": rng_state(),
        "task": run.task.name,
        "best_metric": standing.best,
        "best_epoch": standing.best_epoch,
        "metrics": {k: v for k, v in record.items() if isinstance(v, (int, float))},
        "history": standing.history,  # every epoch's record: metrics.jsonl is rebuilt from it on resume
        **run.task.checkpoint_extra(),
    }


class TrainingStopped(RuntimeError):
    """Training cannot go on (a NaN or infinite loss, output or gradient); the message names the step and
    the kept checkpoint."""


def _agreed(check: Callable[[], Any], device: torch.device) -> Any:
    """Run a start-up check in every process; when it fails in any, every process raises (so none
    waits forever in a collective), and none goes on before all have checked."""
    try:
        result, error = check(), None
    except Exception as err:  # noqa: BLE001 - re-raised below, in this process or as a pointer to it
        result, error = None, err
    if any_across_processes(error is not None, device):
        raise error if error is not None else RunFolderError("a start-up check failed in another process (see its error)")
    return result


def _last_good(folder: RunFolder, epoch: int) -> str:
    if epoch == 0 or not folder.checkpoint.exists():
        return "no epoch had finished, nothing was saved"
    return f"{folder.checkpoint} (epoch {epoch - 1}) is the last good checkpoint and was kept"


def _restore(plan: ResumePlan, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.StepLR, cfg: Config) -> None:
    """Load the resume point into the fresh model, optimizer and scheduler; apply honoured changes."""
    ckpt, source = plan.checkpoint, plan.source
    ours = task.checkpoint_extra().get("classes")
    if ours is not None and ckpt.get("classes") is not None and list(ckpt["classes"]) != list(ours):
        raise RunFolderError(f"{source}: was trained on classes {list(ckpt['classes'])[:10]}, the dataset has "
                             f"{list(ours)[:10]}; resume on the same classes, or fine-tune with --init-from {source}")
    load_state_dict_strict(model, ckpt["model"], str(source))
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{source}: its optimizer state does not fit this model ({first_line(err)})") from None
    apply_schedule(optimizer, scheduler, cfg, plan.changes)
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])


_SCHEDULE_FIELDS = {"optim.lr", "optim.lr_backbone", "optim.lr_drop", "optim.weight_decay"}


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.StepLR, cfg: Config,
                   changes: dict[str, Any]) -> None:
    """Make a restored optimizer and scheduler follow ``cfg``'s learning rates, drop epoch and
    weight decay when a resume changed them (a restored state would otherwise keep the old ones).

    The learning rate of each group becomes ``base * 0.1 ** (epochs done // lr_drop)``, as if the
    run had used the new values from the start; later drops follow the new ``lr_drop``. Without
    such a change nothing is touched (the resume stays bit-exact).
    """
    if not _SCHEDULE_FIELDS & set(changes):
        return
    bases = [cfg.optim.lr, cfg.optim.lr_backbone][: len(optimizer.param_groups)]  # see build_optimizer
    scheduler.step_size = max(1, cfg.optim.lr_drop)
    scheduler.base_lrs = list(bases)
    drops = scheduler.last_epoch // scheduler.step_size
    for group, base in zip(optimizer.param_groups, bases):
        group["initial_lr"] = base
        group["lr"] = base * scheduler.gamma ** drops
        group["weight_decay"] = cfg.optim.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def check_images(datasets: list[Dataset | None], dist_info: DistInfo = DistInfo()) -> None:
    """Decode every image file of ``datasets`` (every split) once, before training starts.

    Datasets that list their files (``image_check_items``, also behind ``.dataset`` wrappers)
    are checked; the files are shared out over the processes. Every unusable file is logged,
    and one DataError counts them and names the first few: a corrupt val image no longer
    waits for the first evaluation, an epoch later.
    """
    items: dict[str, tuple[int, int] | None] = {}
    for dataset in datasets:
        source = _listing(dataset)
        if source is not None:
            for path, hw in source.image_check_items():
                items.setdefault(str(path), hw)
    if not items:
        return
    listed = sorted(items.items())[dist_info.rank::dist_info.world_size]
    start = time.perf_counter()
    problems = gather_lists(find_unusable_images(listed))
    log.info("checked %d image files in %.1f s", len(items), time.perf_counter() - start)
    if problems:
        for problem in problems:
            log.warning("unusable image: %s", problem)
        more = f" (+{len(problems) - 3} more, each logged above)" if len(problems) > 3 else ""
        raise DataError(f"{len(problems)} of {len(items)} image files cannot be used: {'; '.join(problems[:3])}{more}")


def _listing(dataset: Any, depth: int = 4) -> Any:
    """The dataset (``dataset`` itself or one it wraps) that can list its image files, or None."""
    for _ in range(depth):
        if dataset is None or hasattr(dataset, "image_check_items"):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None
