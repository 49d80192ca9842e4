"""`updetr demo --quick`: the README's first quick-start command, at a toy budget; a re-run reuses every stage."""

import dataclasses
import json
from pathlib import Path

import pytest

from updetr.config import ConfigError
from updetr.demo import DemoBudget, apply_budget_overrides, run_demo


@pytest.mark.slow
def test_quick_demo_writes_every_report_artefact_and_reuses_its_cache(tmp_path, one_thread):
    out = tmp_path / "demo"
    first = run_demo(out, quick=True, device="cpu", progress=False)
    report = first.report_dir
    for name in ("report.md", "convergence.png", "detections.png", "query_patches.png", "results.json"):
        assert (report / name).is_file(), name
    results = json.loads((report / "results.json").read_text())
    # the table is generated from the runs' metrics logs
    detr_final = results["eval_points"]["DETR"][-1]["val/AP"]
    assert f"| DETR | 2 | {detr_final:.1f} |" in first.table
    assert "| UP-DETR − DETR |" in first.table
    stages = sorted(p.name for p in (out / "stages").iterdir() if p.name != "features")  # features: the CNN's maps
    assert [s.split("-")[0] for s in stages] == ["data", "detr", "pretrain", "updetr"]  # no CNN stage
    # every training stage starts from the same frozen ImageNet CNN: the packaged EfficientNet-Lite0 weights
    for stage in stages[1:]:
        cfg = json.loads((out / "stages" / stage / "config.json").read_text())
        assert (cfg["model"]["backbone"], cfg["model"]["backbone_weights"]) == ("efficientnet_lite0", "imagenet")
        assert cfg["optim"]["lr_backbone"] == 0.0 and cfg["data"]["cache_features"] is True
    mtimes = {p: p.stat().st_mtime for p in (out / "stages").rglob("checkpoint.pth")}
    second = run_demo(out, quick=True, device="cpu", progress=False)
    assert second.table == first.table
    assert {p: p.stat().st_mtime for p in (out / "stages").rglob("checkpoint.pth")} == mtimes
    assert second.seconds < first.seconds

    # --budget oneshot_epochs=N adds one-shot detection from scratch and from the same pre-training, nothing rerun
    third = run_demo(out, device="cpu", progress=False, budget=dataclasses.replace(DemoBudget.quick(), oneshot_epochs=1))
    assert third.table == first.table
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    oneshot = sorted(p for p in (out / "stages").iterdir() if p.name.startswith("oneshot-"))
    assert len(oneshot) == 2
    results = json.loads((report / "results.json").read_text())["oneshot"]
    assert set(results) == {"DETR", "UP-DETR"}
    for arm, entry in results.items():
        logged = [json.loads(line) for line in (Path(entry["run"]) / "metrics.jsonl").read_text().splitlines()]
        assert entry["eval_points"] == [{k: r[k] for k in ("epoch", "val/AP50_seen", "val/AP50_unseen")}
                                        for r in logged if "val/AP50_seen" in r] != []
    init = {json.loads((d / "config.json").read_text())["init_from"] for d in oneshot}
    (pretrain,) = (p for p in (out / "stages").iterdir() if p.name.startswith("pretrain-"))
    assert init == {"", str(pretrain / "checkpoint.pth")}  # from scratch, and from the demo's own pre-training
    assert "One-shot detection (AP50 on seen / unseen" in (report / "report.md").read_text()


@pytest.mark.slow
def test_stages_in_parallel_processes_train_exactly_what_they_train_one_after_another(tmp_path, one_thread,
                                                                                      monkeypatch):
    import updetr.demo

    # two one-thread processes whatever this machine's core count, so both runs use one thread per training
    monkeypatch.setattr(updetr.demo, "parallel_slots", lambda device, workers: (workers, 1) if workers > 1 else (1, 0))
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        run_demo(out, device="cpu", progress=False, budget=dataclasses.replace(DemoBudget.quick(), workers=workers))
        runs[workers] = {p.parent.name.split("-")[0]: [json.loads(line) for line in p.read_text().splitlines()]
                         for p in (out / "stages").glob("*/metrics.jsonl")}
    assert sorted(runs[2]) == ["detr", "pretrain", "updetr"]
    for stage, records in runs[2].items():
        drop = ("train/images_per_s",)  # the only measured, not computed, value
        assert [{k: v for k, v in r.items() if k not in drop} for r in records] == \
            [{k: v for k, v in r.items() if k not in drop} for r in runs[1][stage]], stage


def test_budget_overrides_take_the_set_grammar_and_append_config_overrides():
    budget = apply_budget_overrides(DemoBudget(), ["finetune_epochs=12", "image_size=[96,128]",
                                                   "backbone=efficientnet_lite1", "finetune=optim.lr=5e-4",
                                                   "finetune=model.num_queries=10", "max_objects=3"])
    assert budget.max_objects == 3 and budget.backbone == "efficientnet_lite1"
    assert budget.finetune_epochs == 12 and budget.image_size == (96, 128)
    assert budget.finetune == ["optim.lr=5e-4", "model.num_queries=10"]
    assert DemoBudget().finetune == []  # the default is not modified
    for bad, message in [("epochs=3", "FIELD one of"), ("cnn_epochs=5", "FIELD one of"),  # the CNN stage is gone
                         ("finetune_epochs=many", "must be an integer, got 'many'"),
                         ("finetune_epochs=2.5", "must be an integer"), ("image_size=[96]", "list of 2"),
                         ("finetune_epochs", "FIELD=VALUE")]:
        with pytest.raises(ConfigError, match=message):
            apply_budget_overrides(DemoBudget(), [bad])


def test_comparison_table_reads_the_logs_and_shows_a_zero_gap_without_a_sign(tmp_path):
    import json

    from updetr.report import comparison_table

    arms = {}
    for name, aps in (("DETR", [(3, 1.04, 5.0), (7, 2.52, 9.96)]), ("UP-DETR", [(3, 4.0, 7.0), (7, 2.5, 12.0)])):
        run = tmp_path / name
        run.mkdir()
        lines = [{"epoch": e, "val/AP": ap, "val/AP50": ap50, "val/AP75": 0.01} for e, ap, ap50 in aps]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"epoch": 0}] + lines))
        arms[name] = run
    table = comparison_table(arms).splitlines()
    assert table[2] == "| DETR | 8 | 2.5 | 10.0 | 0.0 |"
    assert table[3] == "| UP-DETR | 8 | 2.5 | 12.0 | 0.0 |"
    assert table[4] == "| UP-DETR − DETR | | 0.0 | +2.0 | 0.0 |"  # -0.02 rounds to 0.0, shown without a sign
    assert "| DETR | 1.0 | 2.5 |" in table and "| UP-DETR | 4.0 | 2.5 |" in table
