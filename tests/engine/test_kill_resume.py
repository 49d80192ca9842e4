"""benchmarks/kill_resume.py in small: SIGKILL at three commit points, resume, compare with the uninterrupted run."""

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from updetr.cli import main

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigkill_at_the_checkpoint_write_the_rename_and_the_metrics_append_loses_nothing(tmp_path):
    kr = _load("kill_resume")
    data = kr.write_squares(tmp_path / "data")
    args = kr.train_args(data, epochs=2, steps=1)
    reference = tmp_path / "reference"
    assert main(args + ["--output", str(reference)]) == 0  # this process: the same torch threads as the children
    threads = torch.get_num_threads()
    expected = {  # what each kill left behind, so the fault really fired where it says
        "write:1": "checkpoint epoch 0, metrics [0], checkpoint.pth.tmp",
        "rename:0": "checkpoint epoch 0",
        "append:0": "checkpoint epoch 0, metrics [] + a partial line",
    }
    cases = {fault: tmp_path / fault.replace(":", "-") for fault in expected}

    def kill(fault):  # the three killed runs side by side; resumed one by one below, in this process
        return kr.kill_case(cases[fault], args, fault=fault, threads=threads, resume=lambda resume_args: 0)

    with ThreadPoolExecutor(len(cases)) as pool:
        states = dict(zip(cases, pool.map(kill, cases)))
    assert states == expected
    for fault, case in cases.items():
        assert main(args + ["--resume", str(case)]) == 0
        result = kr.check(case, reference)
        assert result["ok"], (fault, result)  # loads, no leftovers, every epoch once, same records and weights
