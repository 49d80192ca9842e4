"""benchmarks/kill_resume.py in small: SIGKILL at three commit points, resume, compare with the uninterrupted run."""

import multiprocessing
import signal
from pathlib import Path

import pytest
import torch

from updetr.cli import main

pytestmark = pytest.mark.slow  # four training runs, three of them killed

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# what the killed processes import; a fork server imports it once and forks each of them ready to run
_PRELOAD = ["torch", "torchvision", "updetr.engine.detection", "updetr.engine.loop", "updetr.engine.one_shot",
            "updetr.engine.panoptic", "kill_resume"]


def test_sigkill_at_the_checkpoint_write_the_rename_and_the_metrics_append_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import kill_resume as kr

    data = kr.write_squares(tmp_path / "data")
    args = kr.train_args(data, epochs=2, steps=1)
    reference = tmp_path / "reference"
    assert main(args + ["--output", str(reference)]) == 0  # this process: the same torch threads as the killed ones
    expected = {  # what each kill left behind, so the fault really fired where it says
        "write:1": "checkpoint epoch 0, metrics [0], checkpoint.pth.tmp",
        "rename:0": "checkpoint epoch 0",
        "append:0": "checkpoint epoch 0, metrics [] + a partial line",
    }
    context = multiprocessing.get_context("forkserver")  # a process of its own, as in the benchmark, without
    context.set_forkserver_preload(_PRELOAD)  # paying torch's import three times
    cases = {fault: tmp_path / fault.replace(":", "-") for fault in expected}
    runs = {fault: context.Process(target=kr.child_main, args=(torch.get_num_threads(), fault,
                                                                  args + ["--output", str(case)]))
            for fault, case in cases.items()}
    for run in runs.values():  # side by side
        run.start()
    for fault, run in runs.items():
        run.join()
        assert run.exitcode == -signal.SIGKILL, fault
    assert {fault: kr.describe(case) for fault, case in cases.items()} == expected
    for fault, case in cases.items():  # resumed one by one, in this process
        assert main(args + ["--resume", str(case)]) == 0
        result = kr.check(case, reference)
        assert result["ok"], (fault, result)  # loads, no leftovers, every epoch once, same records and weights
