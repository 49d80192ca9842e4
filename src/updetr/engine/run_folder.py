"""The run folder: what a training run owns, and the rules that keep it true.

A run folder holds::

    config.json        the resolved config the run trains with; written once every start-up check passed
    checkpoint.pth     the last finished epoch: weights, optimizer, scheduler, RNG state, config and the
                       metrics record of every epoch so far ("history"). Its atomic rename is the
                       commit point of an epoch.
    best.pth           the epoch with the best validation metric (a hard link to that epoch's checkpoint)
    metrics.jsonl      one JSON line per finished epoch, in order; rebuilt from checkpoint.pth on resume
    resumes.jsonl      one line per resume: the checkpoint it started from, the epoch, the settings changed
    superseded-after-epoch-N/   what a resume from an older checkpoint set aside (never deleted)

The rules (:class:`RunFolder`):

1. **A fresh run needs an empty or absent folder.** Anything else is refused with a message that
   names ``--resume`` and ``--output`` (the command line gives the preset's default output a new
   numbered folder instead, see ``updetr.cli``).
2. **A resume checks before it writes.** The checkpoint must be a training checkpoint of the same
   task; its stored config is compared with the requested one field by field. Fields that define
   what is trained (model, pre-training, one-shot, loss, seed, data format and augmentation) must
   be equal: a change is refused, naming every field. The fields of ``resume_rules.HONOURED_ON_RESUME``
   (schedule, learning rates, epochs, evaluation, batch, workers, device, data paths, output folder)
   may change: the resumed run uses the new values from its first epoch on, and ``resumes.jsonl``
   and ``config.json`` record them. ``model.backbone_weights`` and ``init_from`` only initialise
   a run: they keep their stored values (a different non-empty value is refused).
3. **Nothing is written until every check has passed** (config, data, images, model, checkpoint):
   :meth:`RunFolder.claim` is the first write, so a refused start leaves the folder as it was.
4. **An epoch is committed by one rename.** :meth:`RunFolder.commit_epoch` writes
   ``checkpoint.pth.tmp``, syncs it to disk and renames it over ``checkpoint.pth``; then links
   ``best.pth`` and appends the metrics line. A kill at any instant leaves ``checkpoint.pth`` at
   the last committed epoch and every file loadable; the resume rebuilds ``metrics.jsonl`` and
   ``best.pth`` from it, so no epoch's record is lost or doubled.
5. **A resume from an older checkpoint loses nothing.** The later ``checkpoint.pth``, ``best.pth``
   and metrics lines move to ``superseded-after-epoch-N/``, with a warning.
6. **``--resume FOLDER`` is idempotent**: it continues the folder's ``checkpoint.pth``, or, when the
   run never finished an epoch (or the folder is empty or absent), starts it there from epoch 0.
   A scheduler can repeat the same command after every preemption.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError
from .checkpoint import first_line, fsync_folder, load_checkpoint, save_checkpoint
from .resume_rules import same_path, sort_changes

log = logging.getLogger(__name__)

__all__ = ["ResumePlan", "RunFolder", "RunFolderError", "compare_configs", "read_metrics", "json_safe"]

#: Entries of a checkpoint that training needs to continue from it.
_TRAINING_KEYS = ("epoch", "optimizer", "lr_scheduler", "config")
_RUN_FILES = ("config.json", "checkpoint.pth", "best.pth", "metrics.jsonl", "resumes.jsonl")


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked (occupied, unwritable, an incompatible resume); the
    message is one line naming the folder, file or config fields, and what to do instead."""


@dataclass
class ResumePlan:
    """What :meth:`RunFolder.plan_resume` found; nothing has been written yet.

    ``checkpoint`` is None for a run that never finished an epoch: it starts from epoch 0.
    """

    source: Path | None  # the checkpoint file read
    checkpoint: dict[str, Any] | None
    config: Config  # what the resumed run trains with (requested; initialisation fields as stored)
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    best_epoch: int | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field -> (stored, new), honoured


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """NaN (e.g. the AP of an area range without objects) becomes null: the record stays strict JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


def compare_configs(stored: dict[str, Any], requested: Config, source: str) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """Check a resume's requested config against the checkpoint's.

    Returns:
        ``(config the resumed run trains with, {field: (stored, new)} of the honoured changes)``.

    Raises:
        RunFolderError: a field outside ``resume_rules.HONOURED_ON_RESUME`` differs (all such fields are
            named with both values), or a change cannot be honoured (a frozen CNN made trainable).
    """
    try:
        stored_cfg = Config.from_dict(stored, source)
    except ConfigError as err:
        raise RunFolderError(f"{source}: the config stored in the checkpoint is not valid any more ({err})") from None
    effective, honoured, refused = sort_changes(stored_cfg, requested)
    if refused:
        raise RunFolderError(
            f"{source}: cannot resume with a different setup: {'; '.join(refused)}. Resume with the checkpoint's "
            "settings (its config.json), or start a new run in a fresh folder (--output DIR, --init-from to start "
            "from these weights)"
        )
    return Config.from_dict(effective, "resumed config"), honoured


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``.

    A last line that is not valid JSON (a kill during the append) is dropped with a warning.

    Raises:
        RunFolderError: another line is not a JSON object; the message names the file and line.
    """
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path}: cannot read the metrics ({first_line(err)})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("not an object with an integer 'epoch'")
        except ValueError as err:
            if number == len(lines):
                log.warning("%s:%d: dropped a partial last line (the run was stopped while writing it)", path, number)
                break
            raise RunFolderError(f"{path}:{number}: not a metrics record ({first_line(err)}); fix or remove that "
                                 "line, then resume again") from None
        records.append(record)
    return records


def _checkpoint_epoch(path: Path) -> int | None:
    """The ``epoch`` a checkpoint file holds, reading only that (memory-mapped); None if unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch"))
    except Exception:  # noqa: BLE001 - any unreadable file is set aside rather than trusted
        return None


class RunFolder:
    """The folder of one training run (see the module docstring for its files and rules)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / "checkpoint.pth"
        self.best = self.path / "best.pth"
        self.metrics = self.path / "metrics.jsonl"
        self.config = self.path / "config.json"
        self.resumes = self.path / "resumes.jsonl"

    # ----------------------------------------------------------------------------- before training
    def check_fresh(self, reason: str = "") -> None:
        """A fresh run may start here: the folder is absent or empty, and it can be created and written.

        Raises:
            RunFolderError: the path is a file, the folder holds anything, or it cannot be written.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"output_dir={self.path}: is a file, not a folder; choose another --output")
        if self.path.is_dir():
            entries = sorted(os.listdir(self.path))
            if entries:
                held = [e for e in _RUN_FILES if e in entries] or entries
                shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
                raise RunFolderError(
                    f"{self.path}: already holds {'a run' if any(e in _RUN_FILES for e in entries) else 'files'} "
                    f"({shown}){reason}; continue that run with --resume {self.path}, or train into a fresh folder "
                    "with --output DIR"
                )
        self.check_writable()

    def check_writable(self) -> None:
        """The folder (or its nearest existing parent, where it will be created) accepts new files."""
        probe_dir = self.path
        while not probe_dir.exists():
            if probe_dir.parent == probe_dir:
                break
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise RunFolderError(f"output_dir={self.path}: cannot create the run folder, {probe_dir} is a file")
        try:
            with tempfile.TemporaryFile(dir=probe_dir, prefix=".updetr-write-test-"):
                pass
        except OSError as err:
            where = "in" if probe_dir == self.path else f"under {probe_dir}, where it would be created:"
            raise RunFolderError(f"output_dir={self.path}: cannot write {where} {err.strerror or first_line(err)}; "
                                 "choose another --output") from None

    def plan_resume(self, source: str | os.PathLike, cfg: Config, task_name: str) -> ResumePlan:
        """Read and check what ``--resume source`` asks for; nothing is written.

        ``source`` is a checkpoint file, or a run folder (its ``checkpoint.pth``; a folder whose run
        never finished an epoch, or an empty or absent one, starts from epoch 0). Resuming a
        checkpoint of another folder continues that run in this one, which must then be fresh.

        Raises:
            RunFolderError, CheckpointError: the checkpoint is unreadable, not a training checkpoint
                of this task, or the requested config differs in a field that cannot change.
        """
        source = Path(source)
        if source.is_dir() or not source.exists() and not source.suffix:
            if (source / "checkpoint.pth").is_file():
                source = source / "checkpoint.pth"
            else:
                return self._plan_restart(source, cfg)
        ckpt = load_checkpoint(source)
        missing = [k for k in _TRAINING_KEYS if k not in ckpt]
        if missing or int(ckpt.get("epoch", -1)) < 0:
            raise RunFolderError(
                f"{source}: not a checkpoint that training can continue (it has no {', '.join(missing) or 'finished epoch'}: "
                f"weights only). To start a new run from these weights use --init-from {source} (a detector or "
                "pre-training checkpoint) or --backbone-weights (a CNN)"
            )
        if ckpt.get("task", "detection") != task_name:
            raise RunFolderError(f"{source}: is a {ckpt.get('task')!r} checkpoint; this command trains {task_name!r}")
        config, changes = compare_configs(ckpt["config"], cfg, str(source))
        epoch = int(ckpt["epoch"])
        if epoch + 1 > config.optim.epochs:
            raise RunFolderError(f"{source}: has finished {epoch + 1} epochs, more than optim.epochs={config.optim.epochs}; "
                                 "to train longer raise --epochs")
        if not same_path(str(source.parent), str(self.path)):
            self.check_fresh(f", so {source} cannot continue into it")
        if "history" in ckpt:
            history = [dict(r) for r in ckpt["history"]]
        else:  # a checkpoint written before the history travelled inside it
            history = [r for r in read_metrics(source.parent / "metrics.jsonl") if r["epoch"] <= epoch]
        return ResumePlan(source=source, checkpoint=ckpt, config=config, start_epoch=epoch + 1, history=history,
                          best=ckpt.get("best_metric"), best_epoch=ckpt.get("best_epoch"), changes=changes)

    def _plan_restart(self, source: Path, cfg: Config) -> ResumePlan:
        """``--resume FOLDER`` where FOLDER has no checkpoint: start the run there from epoch 0."""
        if not same_path(str(source), str(self.path)):
            raise RunFolderError(f"{source}: holds no checkpoint.pth to resume from")
        if self.path.is_dir() and any(e != "config.json" and not e.endswith(".tmp") for e in os.listdir(self.path)):
            raise RunFolderError(f"{self.path}: holds no checkpoint.pth but other files ({', '.join(sorted(os.listdir(self.path))[:5])}); "
                                 "nothing to resume. Train into a fresh folder with --output DIR")
        changes: dict[str, tuple[Any, Any]] = {}
        config = cfg
        if self.config.is_file():
            try:
                stored = json.loads(self.config.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise RunFolderError(f"{self.config}: cannot read the run's config ({first_line(err)})") from None
            config, changes = compare_configs(stored, cfg, str(self.config))
            log.info("%s: the run never finished an epoch; starting it again from epoch 0", self.path)
        else:
            log.info("%s: nothing to resume yet; starting the run there from epoch 0", self.path)
        self.check_writable()
        return ResumePlan(source=None, checkpoint=None, config=config, changes=changes)

    # ----------------------------------------------------------------------------- first write
    def claim(self, cfg: Config, plan: ResumePlan | None) -> None:
        """Take the folder for this run, after every check passed: set aside what a resume from an
        older checkpoint supersedes, make ``checkpoint.pth`` the resume point, rebuild
        ``metrics.jsonl`` and ``best.pth`` from it, record the resume, write ``config.json``."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for leftover in self.path.glob("*.tmp"):  # a write a kill interrupted; never committed
                leftover.unlink()
            if plan is not None and plan.checkpoint is not None:
                self._adopt(plan)
            _write_atomic(self.config, json.dumps(cfg.to_dict(), indent=2) + "\n")
        except OSError as err:
            raise RunFolderError(f"{err.filename or self.path}: cannot write the run folder ({err.strerror or first_line(err)})") from None
        fsync_folder(self.path)

    def _adopt(self, plan: ResumePlan) -> None:
        epoch = plan.start_epoch - 1
        source = plan.source
        assert source is not None
        aside = self._superseded(plan, epoch)
        if aside:  # linked (or copied) first, replaced after: a kill in between leaves a resumable folder
            target = self._free_name(f"superseded-after-epoch-{epoch}")
            target.mkdir()
            for name in aside:
                _link_or_copy(self.path / name, target / name)
            log.warning("resuming from %s (epoch %d): the later epochs of this folder (%s) were moved to %s", source,
                        epoch, ", ".join(aside), target)
        if not self.checkpoint.exists() or not os.path.samefile(source, self.checkpoint):
            _link_or_copy(source, self.checkpoint)  # checkpoint.pth is the resume point from now on
        if "best.pth" in aside and plan.best_epoch != epoch:
            self.best.unlink()  # it belongs to the superseded epochs (a copy is in the superseded folder)
        forked_best = source.parent / "best.pth"
        if plan.best_epoch == epoch:
            if not (self.best.exists() and os.path.samefile(self.best, self.checkpoint)):
                _link_or_copy(self.checkpoint, self.best)  # e.g. a kill came between the rename and best.pth
        elif not self.best.exists() and forked_best.is_file() and _checkpoint_epoch(forked_best) == plan.best_epoch:
            _link_or_copy(forked_best, self.best)  # continuing another folder's run: its best epoch comes along
        try:
            healed = self.metrics.exists() and read_metrics(self.metrics) != plan.history
        except RunFolderError:
            healed = True
        _write_atomic(self.metrics, "".join(json.dumps(json_safe(r)) + "\n" for r in plan.history))
        if healed:
            log.info("%s: rebuilt from %s (epochs 0-%d)", self.metrics, source, epoch)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from": str(source), "start_epoch": plan.start_epoch,
                 "changed": {k: list(v) for k, v in plan.changes.items()}}
        with open(self.resumes, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        for key, (old, new) in plan.changes.items():
            log.warning("resumed with %s changed from %r to %r: honoured from epoch %d on (recorded in %s)", key, old,
                        new, plan.start_epoch, self.resumes.name)

    def _superseded(self, plan: ResumePlan, epoch: int) -> list[str]:
        """Files of this folder that belong to epochs after ``epoch`` (a resume from an older checkpoint)."""
        aside = []
        for name, path in (("checkpoint.pth", self.checkpoint), ("best.pth", self.best)):
            if path.exists() and not os.path.samefile(path, plan.source):
                later = _checkpoint_epoch(path)
                if later is None or later > epoch:
                    aside.append(name)
        if self.metrics.exists():
            try:
                later = any(r["epoch"] > epoch for r in read_metrics(self.metrics))
            except RunFolderError:
                later = True  # unreadable: keep it as it is, the rebuilt file replaces it
            if later:
                aside.append("metrics.jsonl")
        return aside

    def _free_name(self, stem: str) -> Path:
        candidate, n = self.path / stem, 2
        while candidate.exists():
            candidate, n = self.path / f"{stem}-{n}", n + 1
        return candidate

    # ----------------------------------------------------------------------------- every epoch
    def commit_epoch(self, payload: dict[str, Any], record: dict[str, Any], is_best: bool) -> None:
        """Commit one finished epoch: ``checkpoint.pth`` (atomic, synced: the commit point), then
        ``best.pth``, then the metrics line. ``payload`` carries the whole history already.

        Raises:
            CheckpointError, RunFolderError: a file cannot be written; the message names it, and
                the files of the previous epoch are intact.
        """
        save_checkpoint(self.checkpoint, payload)
        try:
            if is_best or not self.best.exists():
                _link_or_copy(self.checkpoint, self.best)
            self._append_metrics(record)
        except OSError as err:
            raise RunFolderError(f"{err.filename or self.path}: cannot write ({err.strerror or first_line(err)}); "
                                 f"{self.checkpoint} holds epoch {record.get('epoch')}") from None

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(record)) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s content, atomically: a hard link (shares the bytes; a later
    atomic replace of ``source`` gives it a new file and leaves ``target`` alone), or a copy
    where the file system has no hard links."""
    tmp = target.with_name(target.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)

