"""The numbers of ``updetr experiment``'s report (:mod:`updetr.experiment_report` writes them out): the paper's
numbers, each run's final metrics read from its ``metrics.jsonl``, the mean ± sample standard deviation over seeds,
and every comparison with its verdict (does our difference have the paper's direction?).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import fmean, stdev
from typing import Any, Callable

from .demo import DemoBudget
from .experiment_plan import Run, SeedPlan, length_points

METRICS = ("AP", "AP50", "AP75")

# The paper's numbers (docs/method.md §2; R50, VOC trainval07+12 -> test2007).
PAPER_TABLE1 = {  # (model, fine-tuning epochs) -> AP, AP50, AP75
    ("DETR", 150): (49.9, 74.5, 53.1), ("UP-DETR", 150): (56.1, 79.7, 60.6),
    ("DETR", 300): (54.1, 78.0, 58.3), ("UP-DETR", 300): (57.2, 80.1, 62.0),
}
PAPER_TABLE5 = {"DETR": (49.9, 74.5, 53.1), "M=1": (53.1, 77.2, 57.4), "M=10": (54.9, 78.7, 59.1)}  # 15-ep pre-training
PAPER_TABLE6_AP50 = {"DETR": 74.5, "a": 74.0, "b": 78.7, "c": 62.0, "d": 78.7}
# AP after 150 fine-tuning epochs vs pre-training length as a fraction of the full 60 epochs:
# none (DETR, Table 1), 15 epochs (the ablation setup, Table 5 M=10), 60 epochs (Table 1 UP-DETR / 150)
PAPER_LENGTH_AP = {0.0: 49.9, 0.25: 54.9, 1.0: 56.1}
PAPER_TABLE3 = {"DETR": {"seen": 46.2, "unseen": 57.3}, "UP-DETR": {"seen": 69.0, "unseen": 73.1}}  # one-shot AP50, VOC
PANOPTIC_METRICS = ("PQ", "SQ", "RQ", "PQth", "SQth", "RQth", "PQst", "SQst", "RQst", "AP_seg")
PAPER_TABLE4 = {  # R50, COCO val (docs/method.md §4); DETR re-run with the per-head softmax fix
    "DETR": dict(zip(PANOPTIC_METRICS, (44.3, 80.0, 54.5, 49.2, 80.6, 60.3, 37.0, 79.1, 45.9, 32.9))),
    "UP-DETR": dict(zip(PANOPTIC_METRICS, (44.7, 80.5, 54.9, 49.7, 80.9, 60.8, 37.2, 79.3, 46.2, 34.3))),
}
PAPER_MASK = ("no noticeable difference after fine-tuning; lower pretext loss late in pre-training "
              "with the mask (Fig. 6, curves only)")


# ----------------------------------------------------------------------------- reading the runs
def read_metrics(run: Run) -> list[dict]:
    path = run.path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics log; the run did not finish (delete {run.path} and re-run)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_with(run: Run, key: str, what: str) -> list[dict]:
    """The run's log records that hold ``key``; an error naming the log and ``what`` is missing when none does."""
    records = [r for r in read_metrics(run) if key in r]
    if not records:
        raise ValueError(f"{run.path / 'metrics.jsonl'}: no {what} record ({key})")
    return records


def detection_points(run: Run) -> list[dict]:
    """The records with a validation AP (one per evaluation point)."""
    return records_with(run, "val/AP", "evaluation")


def final_detection(run: Run, metric: str) -> float | None:
    return detection_points(run)[-1].get(f"val/{metric}")


def final_pretext(run: Run, key: str) -> float | None:
    """``loss`` (the last epoch's mean pretext loss) or ``hit_rate`` (the last evaluation)."""
    name = f"val/{key}" if key == "hit_rate" else f"train/{key}"
    return records_with(run, name, key)[-1][name]


def final_oneshot(run: Run, split: str) -> float | None:
    """AP50 (percent) on the ``seen`` or ``unseen`` classes at the run's last evaluation."""
    return records_with(run, f"val/AP50_{split}", "one-shot evaluation")[-1][f"val/AP50_{split}"]


def final_panoptic(run: Run, metric: str) -> float | None:
    """``metric`` (PQ, SQ, RQ, ..., AP_seg; percent) at a stage-2 run's last evaluation."""
    return records_with(run, "val/PQ", "panoptic evaluation")[-1].get(f"val/{metric}")


# ----------------------------------------------------------------------------- statistics
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def summarise(entries: list[tuple[int, float | None, str]]) -> dict:
    """(seed, value, run folder) per seed -> per-seed values, mean and sample std (None when undefined)."""
    values = [v for _, v, _ in entries]
    ok = bool(values) and all(_finite(v) for v in values)
    return {
        "mean": fmean(values) if ok else None,
        "std": stdev(values) if ok and len(values) > 1 else None,
        "per_seed": [{"seed": s, "value": v, "run": r} for s, v, r in entries],
    }


def verdict(diffs: list[float | None], expected: int, digits: int = 2) -> tuple[bool | None, bool, str]:
    """Does our per-seed difference go the paper's way? ``expected``: +1, -1, or 0 (no noticeable difference).

    Returns (agrees, clear, text). A mean difference that rounds to zero at the ``digits`` the report
    shows counts as no difference. For +1 / -1 we agree when the mean difference has that sign, clearly
    when it is also larger than one standard deviation; for 0 we agree when the mean is within one
    standard deviation of zero (or rounds to zero).
    """
    if not diffs or not all(_finite(d) for d in diffs):
        return None, False, "n/a (missing numbers)"
    mean = fmean(diffs)
    spread = stdev(diffs) if len(diffs) > 1 else 0.0
    zero = abs(mean) < 0.5 * 10.0 ** -digits
    if expected == 0:
        if zero:
            return True, True, "yes (no difference)"
        if abs(mean) <= spread:
            return True, True, "yes (|difference| within one std)"
        return False, False, "no (|difference| larger than one std)"
    same = f"{sum(1 for d in diffs if d * expected > 0)}/{len(diffs)} seeds"
    if zero:
        return False, False, f"no (no difference; {same})"
    if mean * expected < 0:
        return False, False, f"no ({same})"
    clear = abs(mean) > spread
    return True, clear, f"yes ({same})" if clear else f"yes, within one std ({same})"


def epochs_text(n: int) -> str:
    """``1 epoch``, ``3 epochs``."""
    return f"{n} epoch" if n == 1 else f"{n} epochs"


class _Tables:
    """Collects rows and comparisons for one seed set; ``rel`` names run folders relative to the output."""

    def __init__(self, plans: list[SeedPlan], root: Path):
        self.plans, self.root = plans, root

    def rel(self, run: Run) -> str:
        try:
            return run.path.relative_to(self.root).as_posix()
        except ValueError:
            return str(run.path)

    def stat(self, pick: Callable[[SeedPlan], Run], value: Callable[[Run], float | None]) -> dict:
        return summarise([(p.seed, value(pick(p)), self.rel(pick(p))) for p in self.plans])

    def compare(self, label: str, metric: str, a: Callable[[SeedPlan], Run], b: Callable[[SeedPlan], Run],
                value: Callable[[Run], float | None], paper: float | None, paper_text: str, expected: int,
                digits: int = 2) -> dict:
        entries = []
        for p in self.plans:
            va, vb = value(a(p)), value(b(p))
            diff = va - vb if _finite(va) and _finite(vb) else None
            entries.append((p.seed, diff, f"{self.rel(a(p))} − {self.rel(b(p))}"))
        ours = summarise(entries)
        agrees, clear, text = verdict([d for _, d, _ in entries], expected, digits)
        return {"comparison": label, "metric": metric, "ours": ours, "digits": digits, "paper": paper,
                "paper_text": paper_text, "expected_sign": expected, "agrees": agrees, "clear": clear, "verdict": text}


def _ft(name: str) -> Callable[[SeedPlan], Run]:
    return lambda p: p.finetune[name]


def _pre(name: str) -> Callable[[SeedPlan], Run]:
    return lambda p: p.pretrain[name]


def _det(metric: str) -> Callable[[Run], float | None]:
    return lambda run: final_detection(run, metric)


def _paper_diff(a: float, b: float, what: str = "") -> tuple[float, str]:
    d = round(a - b, 1)
    return d, f"{d:+.1f} ({a} vs {b}{what})"


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


# ----------------------------------------------------------------------------- the tables
def _table1(t: _Tables, f: int) -> dict:
    """RQ1 / Table 1: DETR and UP-DETR after F and 2F fine-tuning epochs."""
    rows, comps = [], []
    for name, model, mult in (("detr_F", "DETR", 1), ("default_F", "UP-DETR", 1), ("detr_2F", "DETR", 2),
                              ("default_2F", "UP-DETR", 2)):
        paper = PAPER_TABLE1[(model, 150 * mult)]
        rows.append({"row": model, "epochs": mult * f, "paper_row": f"{model} / {150 * mult}",
                     "metrics": {k: t.stat(_ft(name), _det(k)) for k in METRICS}, "paper": dict(zip(METRICS, paper))})
    for mult, (up, detr) in ((1, ("default_F", "detr_F")), (2, ("default_2F", "detr_2F"))):
        for i, k in enumerate(METRICS):
            d, text = _paper_diff(PAPER_TABLE1[("UP-DETR", 150 * mult)][i], PAPER_TABLE1[("DETR", 150 * mult)][i],
                                  f" at {150 * mult} ep")
            comps.append(t.compare(f"UP-DETR − DETR, {epochs_text(mult * f)}", k, _ft(up), _ft(detr), _det(k), d, text,
                                   _sign(d)))
    return {"rows": rows, "comparisons": comps}


def _table5(t: _Tables, f: int, m: int) -> dict:
    """Table 5: one query patch against M."""
    rows = []
    for name, label, paper_key in (("detr_F", "DETR", "DETR"), ("single_patch_F", "M=1", "M=1"),
                                   ("default_F", f"M={m}", "M=10")):
        rows.append({"row": label, "epochs": f, "paper_row": paper_key,
                     "metrics": {k: t.stat(_ft(name), _det(k)) for k in METRICS},
                     "paper": dict(zip(METRICS, PAPER_TABLE5[paper_key]))})
    d1, text1 = _paper_diff(PAPER_TABLE5["M=10"][0], PAPER_TABLE5["M=1"][0], ", M=10 vs M=1")
    d2, text2 = _paper_diff(PAPER_TABLE5["M=1"][0], PAPER_TABLE5["DETR"][0], ", M=1 vs DETR")
    comps = [t.compare(f"M={m} − M=1", "AP", _ft("default_F"), _ft("single_patch_F"), _det("AP"), d1, text1, _sign(d1)),
             t.compare("M=1 − DETR", "AP", _ft("single_patch_F"), _ft("detr_F"), _det("AP"), d2, text2, _sign(d2))]
    return {"rows": rows, "comparisons": comps}


def _table6(t: _Tables, f: int) -> dict:
    """Table 6: frozen or trained CNN in pre-training x feature reconstruction (AP50)."""
    rows = []
    six = (("detr_F", "DETR", "–", "–", "DETR"), ("unfrozen_no_recon_F", "(a)", "trained", "no", "a"),
           ("frozen_no_recon_F", "(b)", "frozen", "no", "b"), ("unfrozen_recon_F", "(c)", "trained", "yes", "c"),
           ("default_F", "(d) UP-DETR", "frozen", "yes", "d"))
    for name, label, cnn, recon, key in six:
        rows.append({"row": label, "cnn": cnn, "reconstruction": recon, "epochs": f,
                     "metrics": {k: t.stat(_ft(name), _det(k)) for k in ("AP50", "AP")},
                     "paper": {"AP50": PAPER_TABLE6_AP50[key]}})
    p6 = PAPER_TABLE6_AP50
    comps = []
    for label, a, b, ka, kb in (("(b) − (a): freezing the CNN, no reconstruction", "frozen_no_recon_F", "unfrozen_no_recon_F", "b", "a"),
                                ("(d) − (c): freezing the CNN, with reconstruction", "default_F", "unfrozen_recon_F", "d", "c"),
                                ("(c) − (a): reconstruction, trained CNN", "unfrozen_recon_F", "unfrozen_no_recon_F", "c", "a"),
                                ("(d) − (b): reconstruction, frozen CNN", "default_F", "frozen_no_recon_F", "d", "b"),
                                ("(d) − DETR", "default_F", "detr_F", "d", "DETR")):
        d, text = _paper_diff(p6[ka], p6[kb], f", ({ka}) vs ({kb})" if kb != "DETR" else ", (d) vs DETR")
        comps.append(t.compare(label, "AP50", _ft(a), _ft(b), _det("AP50"), d, text, _sign(d)))
    return {"rows": rows, "comparisons": comps}


def _attention_mask(t: _Tables, f: int) -> dict:
    """The attention mask on and off: fine-tuned AP and the final pretext loss."""
    loss = lambda run: final_pretext(run, "loss")  # noqa: E731
    hit = lambda run: final_pretext(run, "hit_rate")  # noqa: E731
    rows = []
    for pre, ft, label in (("default", "default_F", "mask on (default)"), ("no_mask", "no_mask_F", "mask off")):
        rows.append({"row": label, "epochs": f, "metrics": {
            "AP": t.stat(_ft(ft), _det("AP")), "AP50": t.stat(_ft(ft), _det("AP50")),
            "pretext_loss": t.stat(_pre(pre), loss), "pretext_hit_rate": t.stat(_pre(pre), hit)}})
    comps = [t.compare("mask on − off, fine-tuned", "AP", _ft("default_F"), _ft("no_mask_F"), _det("AP"), None,
                       "no noticeable difference", 0),
             t.compare("mask on − off, final pretext loss", "pretext loss", _pre("default"), _pre("no_mask"), loss, None,
                       "lower with the mask (Fig. 6)", -1, digits=3)]
    return {"rows": rows, "comparisons": comps, "paper": PAPER_MASK}


def _pretrain_length(t: _Tables, f: int, p: int) -> dict:
    """Fine-tuned AP against the pre-training length (none, the shorter points, all P epochs)."""
    points = [(0, "detr_F")] + [(e, "default_F" if e == p else f"length_{e}_F") for e in length_points(p)]
    rows = []
    for e, name in points:
        frac = e / p
        paper = next((v for k, v in PAPER_LENGTH_AP.items() if abs(k - frac) < 1e-9), None)
        rows.append({"row": "none (DETR)" if e == 0 else f"{e} of {p}", "pretrain_epochs": e, "fraction": frac,
                     "epochs": f, "metrics": {k: t.stat(_ft(name), _det(k)) for k in ("AP", "AP50")},
                     "paper": {"AP": paper}})
    comps = []
    shortest = points[1]
    if shortest[0] != p:
        d, text = _paper_diff(PAPER_LENGTH_AP[1.0], PAPER_LENGTH_AP[0.25], ", 60 vs 15 pre-training epochs")
        comps.append(t.compare(f"{epochs_text(p)} − {epochs_text(shortest[0])} of pre-training", "AP", _ft("default_F"), _ft(shortest[1]),
                               _det("AP"), d, text, _sign(d)))
    d, text = _paper_diff(PAPER_LENGTH_AP[0.25], PAPER_LENGTH_AP[0.0], ", 15 pre-training epochs vs none")
    comps.append(t.compare(f"{epochs_text(shortest[0])} of pre-training − none (DETR)", "AP", _ft(shortest[1]), _ft("detr_F"),
                           _det("AP"), d, text, _sign(d)))
    return {"rows": rows, "comparisons": comps}


def _table3(t: _Tables, f: int) -> dict:
    """Table 3: one-shot detection, AP50 on seen and unseen classes."""
    shot = lambda name: (lambda p: p.oneshot[name])  # noqa: E731
    ap50 = lambda split: (lambda run: final_oneshot(run, split))  # noqa: E731
    rows = [{"row": model, "init": init, "epochs": f,
             "metrics": {split: t.stat(shot(name), ap50(split)) for split in ("seen", "unseen")},
             "paper": PAPER_TABLE3[model]}
            for name, model, init in (("detr", "DETR", "from scratch"), ("updetr", "UP-DETR", "UP-DETR pre-training"))]
    comps = []
    for split in ("seen", "unseen"):
        d, text = _paper_diff(PAPER_TABLE3["UP-DETR"][split], PAPER_TABLE3["DETR"][split], f", {split} classes")
        comps.append(t.compare(f"one-shot UP-DETR − DETR, {split} classes", "AP50", shot("updetr"), shot("detr"),
                               ap50(split), d, text, _sign(d)))
    return {"rows": rows, "comparisons": comps}


def _table4(t: _Tables, f: int, mask_epochs: int) -> dict:
    """Table 4: panoptic segmentation after stage 2 (and stage 1's box AP)."""
    pan = lambda name: (lambda p: p.panoptic[name])  # noqa: E731
    value = lambda metric: (lambda run: final_panoptic(run, metric))  # noqa: E731
    rows = [{"row": model, "init": init, "epochs": f, "mask_epochs": mask_epochs,
             "metrics": {k: t.stat(pan(f"{name}_2"), value(k)) for k in PANOPTIC_METRICS},
             "box_AP": t.stat(pan(f"{name}_1"), _det("AP")), "paper": PAPER_TABLE4[model]}
            for name, model, init in (("detr", "DETR", "from scratch"), ("updetr", "UP-DETR", "UP-DETR pre-training"))]
    comps = []
    for k in ("PQ", "AP_seg"):
        d, text = _paper_diff(PAPER_TABLE4["UP-DETR"][k], PAPER_TABLE4["DETR"][k])
        comps.append(t.compare("panoptic UP-DETR − DETR", k, pan("updetr_2"), pan("detr_2"), value(k), d, text,
                               _sign(d)))
    return {"rows": rows, "comparisons": comps}


def build_tables(plans: list[SeedPlan], root: Path, budget: DemoBudget) -> dict:
    """Every table of the protocol, in the report's order; Tables 3 and 4 only where the plans have their runs."""
    t = _Tables(plans, root)
    f, m = budget.finetune_epochs, plans[0].pretrain["default"].cfg.pretrain.num_patches
    tables = {"table1": _table1(t, f), "table5": _table5(t, f, m), "table6": _table6(t, f),
              "attention_mask": _attention_mask(t, f), "pretrain_length": _pretrain_length(t, f, budget.pretrain_epochs)}
    if plans[0].oneshot:
        tables["table3"] = _table3(t, f)
    if plans[0].panoptic:
        tables["table4"] = _table4(t, f, plans[0].panoptic["detr_2"].epochs)
    return tables


# ----------------------------------------------------------------------------- curves and the run index
def _curve(plans: list[SeedPlan], root: Path, pick: Callable[[SeedPlan], Run], x_key: str, y_key: str) -> dict:
    t = _Tables(plans, root)
    per_seed, xs = [], None
    for p in plans:
        records = [r for r in read_metrics(pick(p)) if y_key in r]
        x = [r[x_key] + 1 for r in records]
        if xs is not None and x != xs:
            raise ValueError(f"{pick(p).path}: evaluation epochs {x} differ from the other seeds' {xs}")
        xs = x
        per_seed.append({"seed": p.seed, "run": t.rel(pick(p)), "values": [r[y_key] for r in records]})
    stats = [summarise([(s["seed"], s["values"][i], s["run"]) for s in per_seed]) for i in range(len(xs or []))]
    return {"epochs": xs or [], "mean": [s["mean"] for s in stats], "std": [s["std"] for s in stats],
            "per_seed": per_seed}


def build_curves(plans: list[SeedPlan], root: Path) -> dict:
    return {
        "convergence_AP": {"DETR": _curve(plans, root, _ft("detr_2F"), "epoch", "val/AP"),
                           "UP-DETR": _curve(plans, root, _ft("default_2F"), "epoch", "val/AP")},
        "pretext_loss": {"mask on": _curve(plans, root, _pre("default"), "epoch", "train/loss"),
                         "mask off": _curve(plans, root, _pre("no_mask"), "epoch", "train/loss")},
    }


def run_index(plans: list[SeedPlan], root: Path) -> dict[str, dict]:
    """``results.json``'s runs: each run folder (relative to ``root``) with its seed, kind, epochs, label and the
    variants of the plans that use it."""
    runs: dict[str, dict] = {}
    t = _Tables(plans, root)
    for p in plans:
        for group in (p.pretrain, p.finetune, p.oneshot, p.panoptic):
            for name, run in group.items():
                entry = runs.setdefault(t.rel(run), {"seed": run.seed, "kind": run.kind, "epochs": run.epochs,
                                                     "label": run.label, "variants": []})
                entry["variants"].append(name)
    return runs
