"""The stage runner of ``updetr demo``: dependency order, results, and failures, in this process and in spawned ones.

Job functions must be importable by name in a spawned process, so these use the standard library's.
"""

import math
import operator
import os
from pathlib import Path

import pytest

from updetr.stages import Job, JobFailed, parallel_slots, run_jobs


def _chain(tmp_path: Path) -> list[Job]:
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    # "copy" reads the file "write" makes and fails if it runs first; "sum" waits for nothing
    return [Job("copy", Path.read_text, (first,), after=("write",)),
            Job("sum", operator.add, (2, 3)),
            Job("write", Path.write_text, (first, "made first")),
            Job("last", Path.write_text, (second, "made last"), after=("copy", "sum"))]


@pytest.mark.slow  # spawned processes import torch
@pytest.mark.parametrize("processes", [1, 2])
def test_jobs_run_after_what_they_wait_for_and_return_their_results(tmp_path, processes):
    results = run_jobs(_chain(tmp_path), processes=processes, threads=1)
    assert results == {"copy": "made first", "sum": 5, "write": len("made first"), "last": len("made last")}
    assert (tmp_path / "second.txt").read_text() == "made last"


@pytest.mark.slow
def test_a_failing_job_is_raised_with_its_own_type_and_stops_what_waits_for_it(tmp_path):
    jobs = [Job("root", math.sqrt, (-1.0,)), Job("after", Path.write_text, (tmp_path / "x", "no"), after=("root",))]
    for processes in (1, 2):
        with pytest.raises(ValueError, match="math domain error") as info:
            run_jobs(jobs, processes=processes, threads=1)
        assert not (tmp_path / "x").exists()
    assert any("in job 'root'" in note for note in getattr(info.value, "__notes__", []))  # the child's traceback


@pytest.mark.slow
def test_a_process_that_dies_without_an_answer_is_an_error_naming_its_job():
    with pytest.raises(JobFailed, match="job 'crash': its process exited with code 3"):
        run_jobs([Job("crash", os._exit, (3,)), Job("fine", operator.add, (1, 1))], processes=2, threads=1)


def test_bad_plans_are_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "ran"
    touch = Job("touch", Path.write_text, (marker, "x"))
    with pytest.raises(ValueError, match="waits for unknown jobs"):
        run_jobs([touch, Job("a", operator.add, (1, 1), after=("nope",))])
    with pytest.raises(ValueError, match="cycle"):
        run_jobs([touch, Job("a", operator.add, (1, 1), after=("b",)), Job("b", operator.add, (1, 1), after=("a",))])
    with pytest.raises(ValueError, match="repeat"):
        run_jobs([touch, touch])
    assert not marker.exists()


def test_parallel_slots_share_the_cores_and_keep_cuda_in_one_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert parallel_slots("cpu", 2) == (2, 1)
    assert parallel_slots("cpu", 1) == (1, 0)
    assert parallel_slots("cuda", 2) == (1, 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert parallel_slots("cpu", 2) == (2, 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert parallel_slots("cpu", 2) == (1, 0)
