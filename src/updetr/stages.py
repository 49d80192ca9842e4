"""The stage cache of ``updetr demo`` and ``updetr experiment``: one folder per training, named by a hash of
its config, finished when it holds ``DONE``; a re-run reuses every finished stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import queue
import shutil
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .engine.distributed import init_distributed
from .engine.loop import fit

__all__ = ["Job", "JobFailed", "digest", "is_done", "mark_done", "parallel_slots", "run_fit", "run_jobs", "stage_dir"]

log = logging.getLogger(__name__)


def digest(obj: Any) -> str:
    """10 hex digits of the SHA-256 of ``obj`` as sorted JSON (non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def stage_dir(root: Path, name: str, key: Any) -> Path:
    """The folder of stage ``name`` whose settings are ``key``: ``ROOT/stages/<name>-<digest(key)>``."""
    return root / "stages" / f"{name}-{digest(key)}"


def is_done(path: Path) -> bool:
    """Whether the stage in ``path`` finished (its ``DONE`` file exists)."""
    return (path / "DONE").is_file()


def mark_done(path: Path, info: dict) -> None:
    """Mark the stage in ``path`` finished; ``DONE`` holds ``info`` (its final metrics) as JSON."""
    (path / "DONE").write_text(json.dumps(info, indent=2, default=str) + "\n")


def run_fit(task_cls, cfg: Config, progress: bool) -> dict:
    """Train ``task_cls(cfg)`` into ``cfg.output_dir`` from scratch (a stage interrupted earlier is removed first);
    returns ``{"history", "final"}`` (the metrics of every evaluation and the last one)."""
    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)  # a stage interrupted earlier: start it again cleanly
    result = fit(task_cls(cfg), cfg, init_distributed(cfg.device), progress=progress)
    return {"history": result.history, "final": result.final_metrics}


@dataclass(frozen=True)
class Job:
    """One step of a stage plan: ``fn(*args)`` once every job named in ``after`` has returned.

    ``fn`` must be a module-level function (a parallel run sends it to another process by name) and its result
    must pickle.
    """

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    after: tuple[str, ...] = ()


class JobFailed(RuntimeError):
    """A job of :func:`run_jobs` raised; the message holds its name and traceback."""


def parallel_slots(device: str, workers: int) -> tuple[int, int]:
    """``(processes, torch threads each)`` for ``workers`` parallel stage processes on this machine.

    On CUDA the stages share one GPU and run one after another in this process: ``(1, 0)`` (0 = leave the
    thread count alone). On a CPU of ``n`` usable cores: ``min(workers, n)`` processes of ``n // processes``
    threads each, because on a small CPU two one-thread processes train faster together than one two-thread
    process (the transformer's small matrix products do not keep two threads busy).
    """
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = 1 if wants_cuda else max(1, min(workers, cores))
    return (processes, 0) if processes == 1 else (processes, max(1, cores // processes))


def run_jobs(jobs: Sequence[Job], *, processes: int = 1, threads: int = 0,
             on_done: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Run ``jobs`` in the order their ``after`` lists allow and return ``{name: result}``.

    ``on_done(name, result)`` is called here as each job returns (for progress lines).

    With ``processes`` = 1 they run here, one after another, in the listed order where the dependencies allow.
    With more, up to ``processes`` jobs run at once, each in a fresh spawned process with ``threads`` torch
    threads; a job starts as soon as the jobs it waits for have returned (earlier-listed first). The first job
    that raises stops the others (their processes are terminated) and is re-raised here: the original
    exception when it pickles, else :class:`JobFailed` with its traceback. A stage cut short leaves no ``DONE``
    file, so a re-run trains it again.
    """
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names repeat: {names}")
    for job in jobs:
        missing = [d for d in job.after if d not in names]
        if missing:
            raise ValueError(f"job {job.name!r} waits for unknown jobs {missing}")
    _check_acyclic(jobs)
    if processes <= 1:
        results: dict[str, Any] = {}
        pending = list(jobs)
        while pending:
            job = next(j for j in pending if all(d in results for d in j.after))
            pending.remove(job)
            results[job.name] = job.fn(*job.args)
            if on_done is not None:
                on_done(job.name, results[job.name])
        return results
    return _run_parallel(list(jobs), processes, threads, on_done)


def _check_acyclic(jobs: Sequence[Job]) -> None:
    after = {job.name: set(job.after) for job in jobs}
    done: set[str] = set()
    while len(done) < len(after):
        ready = {name for name, deps in after.items() if name not in done and deps <= done}
        if not ready:
            raise ValueError(f"jobs wait for each other in a cycle: {sorted(set(after) - done)}")
        done |= ready


def _run_parallel(jobs: list[Job], processes: int, threads: int, on_done) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    answers = ctx.Queue()
    level = logging.getLogger().getEffectiveLevel()
    results: dict[str, Any] = {}
    running: dict[str, Any] = {}
    pending = list(jobs)
    try:
        while pending or running:
            for job in [j for j in pending if all(d in results for d in j.after)]:
                if len(running) >= processes:
                    break
                pending.remove(job)
                proc = ctx.Process(target=_job_process, args=(job, threads, level, answers), name=f"updetr-{job.name}")
                proc.start()
                running[job.name] = proc
                log.debug("job %s started (pid %d)", job.name, proc.pid)
            name, ok, payload = _next_answer(answers, running)
            running.pop(name).join()
            if not ok:
                raise payload
            results[name] = payload
            if on_done is not None:
                on_done(name, payload)
    finally:
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.join()
    return results


def _next_answer(answers, running: dict[str, Any]) -> tuple[str, bool, Any]:
    """The next (name, ok, result or exception) a job process sends; a process that died without sending one
    (killed, out of memory) is an error naming it."""
    while True:
        try:
            return answers.get(timeout=1.0)
        except queue.Empty:
            for name, proc in running.items():
                if not proc.is_alive():
                    try:  # it may have sent its answer just before exiting
                        return answers.get(timeout=1.0)
                    except queue.Empty:
                        return name, False, JobFailed(f"job {name!r}: its process exited with code {proc.exitcode} "
                                                      "without a result (killed, or out of memory?)")


def _job_process(job: Job, threads: int, level: int, answers) -> None:
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s [{job.name}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        answer = (job.name, True, job.fn(*job.args))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        answer = (job.name, False, _picklable(exc, job.name, "".join(traceback.format_exception(exc))))
    answers.put(answer)
    answers.close()
    answers.join_thread()  # the answer is in the pipe before the process exits


def _picklable(exc: BaseException, name: str, text: str) -> BaseException:
    """``exc`` with the job's traceback as a note when it survives pickling, else a :class:`JobFailed` holding it."""
    try:
        exc.add_note(f"in job {name!r}, whose process raised:\n{text}")
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception that does not survive pickling
        return JobFailed(f"job {name!r} failed:\n{text}")
