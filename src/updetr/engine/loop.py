"""The training loop: ``fit`` runs a :class:`~updetr.engine.task_protocol.Task` for its epochs, with
evaluation, checkpoints in the run folder and exact resume; one epoch is :func:`updetr.engine.epoch.train_one_epoch`.

Everything task-specific (datasets, model, criterion, how a batch is fed, how the
model is evaluated) comes from the Task; the loop is the same for DETR
detection, UP-DETR pre-training, one-shot detection and panoptic segmentation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..config import Config
from ..data.io import DataError, find_unusable_images
from .checkpoint import CheckpointError, first_line, load_state_dict_strict, rng_state, set_rng_state
from .distributed import DistInfo, all_reduce_mean, any_across_processes, barrier, gather_lists
from .epoch import NonFiniteLossError, build_optimizer, train_one_epoch
from .run_folder import ResumePlan, RunFolder, RunFolderError, json_safe
from .task_protocol import Task

log = logging.getLogger(__name__)


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
