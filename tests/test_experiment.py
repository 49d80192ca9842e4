"""`updetr experiment`: the quick protocol end to end, numbers traced to the runs' logs, the stage cache, bad
budgets, and the full-scale configs under configs/."""

import json
import math
from pathlib import Path
from statistics import fmean

import pytest

from updetr.cli import build_parser, config_from_args, main
from updetr.config import ConfigError
from updetr.experiment import experiment_budget, run_experiment

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ARTEFACTS = ("README.md", "convergence.png", "pretext_loss.png", "pretrain_length.png", "results.json")


def _final_eval(root: Path, run: str) -> dict:
    lines = [json.loads(x) for x in (root / run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if "val/AP" in r][-1]


def _close(a, b) -> bool:
    return a is None and b is None or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


@pytest.fixture(scope="module")
def quick_experiment(tmp_path_factory, threads):
    """The quick protocol for seeds 0 and 1, its runs one after another in this process (one thread)."""
    with threads(1):
        out = tmp_path_factory.mktemp("quick") / "exp"
        yield out, run_experiment(out, quick=True, seeds=2, device="cpu", progress=False)


SEED_SET_KEYS = ("run", "mean", "std", "agrees", "clear", "verdict")  # what depends on the other seeds (or the path)


def _per_seed(obj, seed: int):
    """Every per-seed number of a results table for one seed, keyed by where it sits (what a whole seed set decides
    left out, and the run folders, whose names hash the output folder's path)."""
    if isinstance(obj, dict):
        if "per_seed" in obj:
            return [e["value"] for e in obj["per_seed"] if e["seed"] == seed]
        return {k: _per_seed(v, seed) for k, v in obj.items() if k not in SEED_SET_KEYS}
    return [_per_seed(v, seed) for v in obj] if isinstance(obj, list) else obj


def _stats(obj):
    """The per-seed lists of every statistic in a results table."""
    if isinstance(obj, dict):
        if "per_seed" in obj:
            yield obj["per_seed"]
            return
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            yield from _stats(v)


@pytest.mark.slow
def test_quick_experiment_reports_the_logged_numbers_and_reuses_every_stage(quick_experiment, one_thread):
    out, first = quick_experiment
    report = out / "reports"
    for name in ARTEFACTS:
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    results = json.loads((report / "results.json").read_text())
    assert results["protocol"]["seed_values"] == [0, 1]

    # every detection number in every table is the mean of the per-seed values read from the runs' metrics.jsonl
    checked = 0
    for table in results["tables"].values():
        for row in table["rows"]:
            for metric, stat in row["metrics"].items():
                if metric not in ("AP", "AP50", "AP75"):
                    continue
                values = [_final_eval(out, e["run"])[f"val/{metric}"] for e in stat["per_seed"]]
                assert [e["seed"] for e in stat["per_seed"]] == [0, 1]
                assert [e["value"] for e in stat["per_seed"]] == values
                assert _close(stat["mean"], fmean(values))
                checked += 1
    assert checked >= 30
    # and the README shows them
    readme = (report / "README.md").read_text()
    assert readme == first.readme
    assert "Command: `updetr experiment --quick --output DIR`" in readme and results["protocol"]["command"]
    detr = results["tables"]["table1"]["rows"][0]["metrics"]["AP"]
    assert f"| DETR | 1 | {detr['mean']:.2f} ± {detr['std']:.2f} |" in readme
    # comparisons: per-seed differences of the two runs, and a verdict for each
    for comp in results["tables"]["table1"]["comparisons"]:
        assert comp["verdict"].split(" ")[0].rstrip(",") in ("yes", "no")
    mask = results["tables"]["attention_mask"]
    loss_diff = mask["comparisons"][1]["ours"]
    on, off = (row["metrics"]["pretext_loss"] for row in mask["rows"])
    assert _close(loss_diff["mean"], fmean(a["value"] - b["value"] for a, b in zip(on["per_seed"], off["per_seed"])))
    # Table 3: one-shot AP50 on seen / unseen classes, read from the one-shot runs' logs
    table3 = results["tables"]["table3"]
    for row in table3["rows"]:
        for split, stat in row["metrics"].items():
            values = []
            for e in stat["per_seed"]:
                lines = [json.loads(x) for x in (out / e["run"] / "metrics.jsonl").read_text().splitlines() if x.strip()]
                values.append([r for r in lines if f"val/AP50_{split}" in r][-1][f"val/AP50_{split}"])
            assert [e["value"] for e in stat["per_seed"]] == values
            assert all(e["run"].startswith("stages/oneshot-") for e in stat["per_seed"])
    assert "## Table 3: one-shot detection" in readme
    # Table 4: PQ ... AP_seg from the stage-2 runs' logs, each started from its own stage-1 run
    for row in results["tables"]["table4"]["rows"]:
        for metric, stat in row["metrics"].items():
            values = []
            for e in stat["per_seed"]:
                assert e["run"].startswith("stages/panoptic2-")
                lines = [json.loads(x) for x in (out / e["run"] / "metrics.jsonl").read_text().splitlines() if x.strip()]
                values.append([r for r in lines if "val/PQ" in r][-1][f"val/{metric}"])
                init = json.loads((out / e["run"] / "config.json").read_text())["init_from"]
                assert init.replace("\\", "/").split("/")[-2].startswith("panoptic1-")
            assert [e["value"] for e in stat["per_seed"]] == values
    assert "## Table 4: panoptic segmentation" in readme
    comps = [c for t in results["tables"].values() for c in t["comparisons"]]
    assert len(comps) == 21
    for c in comps:  # each comparison's row: ours, the paper's, the verdict
        assert f"| {c['comparison']} | {c['metric']} | " in readme and f"| {c['paper_text']} | {c['verdict']} |" in readme
    assert f"**{sum(c['agrees'] for c in comps)} of 21 comparisons agree in direction with the paper.**" in readme

    # the default pre-training (and its fine-tuning) is one run per seed, shared by every table that needs it
    updetr_f = [e["run"] for e in results["tables"]["table1"]["rows"][1]["metrics"]["AP"]["per_seed"]]
    assert [e["run"] for e in results["tables"]["table5"]["rows"][2]["metrics"]["AP"]["per_seed"]] == updetr_f
    assert [e["run"] for e in results["tables"]["table6"]["rows"][4]["metrics"]["AP"]["per_seed"]] == updetr_f
    assert [e["run"] for e in results["tables"]["pretrain_length"]["rows"][-1]["metrics"]["AP"]["per_seed"]] == updetr_f
    stages = sorted(p.name.split("-")[0] for p in (out / "stages").iterdir())
    # per seed: data, 7 pre-trainings (default, M=1, a, b, c, no mask, half length), DETR F and 2F,
    # UP-DETR F from each pre-training and 2F from the default one, one-shot from scratch and from the default one
    assert stages.count("pretrain") == 2 * 7 and stages.count("detr") == 2 * 2 and stages.count("updetr") == 2 * 8
    assert stages.count("oneshot") == 2 * 2 and stages.count("panoptic1") == 2 * 2 and stages.count("panoptic2") == 2 * 2
    assert stages.count("data") == 2 and set(stages) - {"features"} == {  # features: the frozen CNN's maps
        "data", "pretrain", "detr", "updetr", "oneshot", "panoptic1", "panoptic2"}  # and no CNN stage
    assert all((out / "stages" / s / "DONE").is_file() for s in (p.name for p in (out / "stages").iterdir())
               if not s.startswith(("data", "features")))

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("checkpoint.pth")}
    assert len(mtimes) == 2 * 7 + 2 * 2 + 2 * 8 + 2 * 2 + 2 * 4
    second = run_experiment(out, quick=True, seeds=2, device="cpu", progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("checkpoint.pth")} == mtimes
    assert (report / "README.md").read_text() == readme
    assert json.loads((report / "results.json").read_text()) == results
    assert second.seconds < first.seconds


@pytest.mark.slow
def test_runs_in_parallel_processes_give_the_tables_of_runs_one_after_another(quick_experiment, tmp_path, one_thread,
                                                                              monkeypatch):
    """Two one-thread processes (pre-trainings before the fine-tunings that start from them, the CNN features of
    each seed first) train exactly what one process trains, so every number of seed 0 is the same."""
    from dataclasses import replace

    import updetr.experiment

    monkeypatch.setattr(updetr.experiment, "parallel_slots", lambda device, workers: (workers, 1) if workers > 1 else (1, 0))
    _, serial = quick_experiment
    assert experiment_budget(quick=True).workers == 1  # the fixture's runs went one after another
    budget = replace(experiment_budget(quick=True), workers=2)
    parallel = run_experiment(tmp_path / "w2", budget=budget, seeds=1, device="cpu", progress=False)
    expected, got = _per_seed(serial.results["tables"], 0), _per_seed(parallel.results["tables"], 0)
    assert got == expected
    assert got["table3"]["rows"] and got["table4"]["rows"]
    stats = list(_stats(parallel.results["tables"]))
    assert len(stats) >= 30 and all([e["seed"] for e in st] == [0] for st in stats)  # one number of seed 0 in each


@pytest.mark.parametrize("item, message", [
    ("finetune_epochs=two", "must be an integer, got 'two'"),
    ("epochs=3", "expected FIELD=VALUE with FIELD one of"),
    ("seed=3", "use --seeds N"),
    ("finetune_epochs=0", "finetune_epochs, pretrain_epochs and eval_points must be >= 1"),
    ("pretrain=pretrain.num_patches=3", "pretrain.num_patches=3 must divide model.num_queries=8"),
    ("model=model.no_such_field=1", "unknown field 'model.no_such_field'"),
])
def test_a_bad_budget_item_is_a_clear_error_before_anything_runs(tmp_path, capsys, item, message):
    out = tmp_path / "exp"
    assert main(["experiment", "--quick", "--output", str(out), "--budget", item, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("updetr experiment: error:") and message in err, err
    assert not out.exists()


def test_seeds_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--seeds must be a whole number >= 1"):
        run_experiment(tmp_path / "exp", quick=True, seeds=0, device="cpu", progress=False)


def test_quick_budget_is_the_demo_quick_budget_shrunk():
    from dataclasses import replace

    from updetr.demo import DemoBudget

    quick, demo_quick = experiment_budget(quick=True), DemoBudget.quick()
    assert quick.model == demo_quick.model and quick.num_val == demo_quick.num_val
    assert quick.num_train <= demo_quick.num_train and quick.num_unlabeled <= demo_quick.num_unlabeled
    assert quick.backbone == demo_quick.backbone == DemoBudget().backbone == "efficientnet_lite0"
    assert experiment_budget() == replace(DemoBudget(), num_train=1600, finetune_epochs=6, pretrain_epochs=2)
    assert experiment_budget(overrides=["finetune_epochs=4"]).finetune_epochs == 4
    assert experiment_budget(overrides=["finetune_epochs=4"]).pretrain_epochs == 2


@pytest.mark.parametrize("quick,seeds,overrides", [
    (False, 3, []),
    (False, 5, ["finetune_epochs=4", "image_size=[96,128]", "pretrain=pretrain.query_size=64"]),
    (True, 2, ["pretrain_epochs=3"]),
])
def test_experiment_command_gives_back_the_budget(quick, seeds, overrides):
    import shlex

    from updetr.experiment import default_seeds, experiment_command

    budget = experiment_budget(quick, overrides)
    words = shlex.split(experiment_command(budget, seeds, quick))
    assert words[:2] == ["updetr", "experiment"]
    args = build_parser().parse_args(words[1:])
    assert experiment_budget(args.quick, args.budget) == budget
    assert (args.seeds or default_seeds(quick)) == seeds


# ----------------------------------------------------------------------------- configs/
PRESET = {"pretrain": "pretrain-r50", "train": "r50"}
FILES = {  # file -> (command, data, epochs, lr drop, per-process batch)
    "updetr-pretrain-imagenet.json": ("pretrain", None, 60, 40, 32),
    "updetr-voc-150ep.json": ("train", "voc", 150, 100, 4),
    "updetr-voc-300ep.json": ("train", "voc", 300, 200, 4),
    "detr-voc-150ep.json": ("train", "voc", 150, 100, 4),
    "detr-voc-300ep.json": ("train", "voc", 300, 200, 4),
    "updetr-coco-150ep.json": ("train", "coco", 150, 100, 4),
    "updetr-coco-300ep.json": ("train", "coco", 300, 200, 4),
    "detr-coco-150ep.json": ("train", "coco", 150, 100, 4),
    "detr-coco-300ep.json": ("train", "coco", 300, 200, 4),
}
RECIPE = ("model", "loss", "data", "optim", "seed", "output_dir", "eval_every", "init_from")


def _load(command: str, preset: str, file: Path):
    return config_from_args(build_parser().parse_args([command, "--preset", preset, "--config", str(file)]))


def test_every_config_file_is_listed_and_loads_through_the_cli():
    assert sorted(p.name for p in CONFIGS.glob("*.json")) == sorted(FILES)
    readme = (CONFIGS / "README.md").read_text()
    pre = _load("pretrain", "pretrain-r50", CONFIGS / "updetr-pretrain-imagenet.json")
    for name, (command, fmt, epochs, drop, batch) in FILES.items():
        file = CONFIGS / name
        assert name in readme
        cfg = _load(command, PRESET[command], file)
        # the file alone fixes the recipe: any preset underneath gives the same values
        other = _load(command, "detr", file).to_dict()
        assert {k: cfg.to_dict()[k] for k in RECIPE} == {k: other[k] for k in RECIPE}, name
        assert (cfg.optim.epochs, cfg.optim.lr_drop, cfg.data.batch_size) == (epochs, drop, batch), name
        # the paper's global batch on 8 GPUs: 8 x 32 = 256 for pre-training, 8 x 4 = 32 for fine-tuning
        assert cfg.data.batch_size * 8 == (256 if command == "pretrain" else 32)
        assert cfg.model.backbone == "resnet50" and cfg.model.pre_norm and cfg.model.num_queries == 100
        # the documented commands are the file's own
        meta = json.loads(file.read_text())
        assert f"--config configs/{name}" in meta["_command_1gpu"] and f"--config configs/{name}" in meta["_command_8gpu"]
        assert meta["_command_8gpu"].startswith(f"torchrun --nproc_per_node=8 -m updetr {command} ")
        assert meta["_command_1gpu"].startswith(f"updetr {command} ")
        if command == "pretrain":
            p = cfg.pretrain
            assert (p.num_patches, p.freeze_backbone, p.feature_reconstruction, p.attention_mask) == (10, True, True, True)
            assert cfg.model.backbone_weights == "swav" and cfg.optim.lr_backbone == 0.0 and cfg.loss.eos_coef is None
            cfg.check_query_groups()
            continue
        assert cfg.data.format == fmt and (cfg.optim.lr, cfg.optim.lr_backbone) == (1e-4, 5e-5)
        if name.startswith("updetr"):
            assert cfg.init_from == f"{pre.output_dir}/checkpoint.pth"  # what the pre-training file writes
            arch = {k: v for k, v in cfg.to_dict()["model"].items() if k not in ("backbone_weights", "num_classes")}
            assert arch == {k: v for k, v in pre.to_dict()["model"].items() if k not in ("backbone_weights", "num_classes")}
        else:
            assert cfg.init_from == "" and cfg.model.backbone_weights == "swav"


def test_the_time_left_estimate_reads_its_rates_from_the_measurement_file(tmp_path):
    from updetr.experiment import RATE_NAMES, RATES_FILE, stage_rates

    rates = stage_rates()
    assert set(rates) == set(RATE_NAMES) and all(v > 0 for v in rates.values())
    stored = json.loads(RATES_FILE.read_text())["rates"]
    assert all(stored[name]["source"] for name in RATE_NAMES)  # every rate says where it was measured
    broken = tmp_path / "rates.json"
    broken.write_text(json.dumps({"rates": {**stored, "cache": {"images_per_s": 0}}}))
    with pytest.raises(ConfigError, match="rates must be > 0 images/s: cache"):
        stage_rates(broken)
    broken.write_text("{}")
    with pytest.raises(ConfigError, match="not a stage-rates file"):
        stage_rates(broken)


def test_stage_rates_measures_each_finished_run_by_its_kind(tmp_path, load_script):
    module = load_script("benchmarks/stage_rates.py")

    def stage(name, speeds, cache, frozen=True, done=True):
        folder = tmp_path / "exp" / "stages" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"data": {"cache_features": cache},
                                                        "pretrain": {"freeze_backbone": frozen}}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"train/images_per_s": v}) + "\n" for v in speeds))
        if done:
            (folder / "DONE").write_text("")

    stage("detr-aa", [10, 30, 20], True)
    stage("updetr-bb", [40, 40, 40], True)
    stage("pretrain-cc", [5, 7], True, frozen=False)
    stage("oneshot-dd", [9], False)
    stage("detr-ee", [1000], True, done=False)  # unfinished: not counted
    measured = module.measure(tmp_path / "exp")
    assert measured == {"finetune": [20, 40], "pretrain_trained_cnn": [6], "oneshot_uncached": [9]}


def test_experiment_runs_lists_each_finished_run_with_its_start_and_last_evaluation(tmp_path, load_script, capsys):
    module = load_script("benchmarks/experiment_runs.py")
    for name, cfg, records, done in (
        ("detr-aa", {"seed": 1, "optim": {"epochs": 6}, "init_from": ""},
         [{"val/AP": 5.0}, {"train/loss": 1.0}, {"val/AP": 12.5, "val/AP50": 40.0}], True),
        ("updetr-bb", {"seed": 1, "optim": {"epochs": 6}, "init_from": "/x/stages/pretrain-cc/checkpoint.pth"},
         [{"val/AP": 13.0}], True),
        ("detr-dd", {"seed": 2, "optim": {"epochs": 6}, "init_from": ""}, [{"val/AP": 99.0}], False),  # running
    ):
        folder = tmp_path / "exp" / "stages" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(cfg))
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if done:
            (folder / "DONE").write_text("")
    rows = {r["name"]: r for r in module.finished_runs(tmp_path / "exp")}
    assert set(rows) == {"detr-aa", "updetr-bb"}
    assert rows["detr-aa"]["metrics"] == {"AP": 12.5, "AP50": 40.0} and rows["detr-aa"]["init"] == "scratch"
    assert rows["updetr-bb"]["init"] == "pretrain-cc"
    assert module.main([str(tmp_path / "exp"), "--kind", "updetr"]) == 0
    out = capsys.readouterr().out
    assert "| updetr-bb | 1 | 6 | pretrain-cc | AP 13.0 |" in out and "detr-aa" not in out
