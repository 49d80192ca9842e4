"""``updetr experiment``: the paper's tables rerun at small scale, with error bars over seeds.

For every seed ``s`` in ``0..N-1`` the embedded benchmark and every training use seed ``s``
(``dataclasses.replace(budget, seed=s)``). With F = ``budget.finetune_epochs`` and
P = ``budget.pretrain_epochs`` the protocol is:

* RQ1 / Table 1: DETR vs UP-DETR (default pre-training) fine-tuned for F and for 2F epochs
  (two schedules, each with its lr drop at 2/3, as the paper's 150 / 300 epochs);
* Table 5: one query patch vs M (the budget's ``pretrain.num_patches``), fine-tuned for F;
* Table 6: CNN frozen vs trained during pre-training × feature reconstruction on / off;
* the attention mask on vs off: fine-tuned AP and the final pretext loss;
* pre-training length: 1/4, 1/2 and 1 × P epochs (distinct whole numbers of epochs), fine-tuned for F;
* Table 3: one-shot detection (seen / unseen classes of the benchmark's split) trained for F epochs from
  scratch (the paper's DETR row) and from the default pre-training;
* Table 4: panoptic segmentation, DETR's two stages (the detector on the segments' boxes for F epochs, then
  the mask head on the frozen detector for 25/300 of that), from scratch and from the default pre-training.

Every run is a demo stage (``OUT/stages/<kind>-<hash of its config>`` with a ``DONE`` marker), built
exactly as ``updetr demo`` builds it, so a configuration asked for by several tables (the default
pre-training serves RQ1, Table 5's M row, Table 6 (d), mask on and the full-length point) runs once,
and a re-run reuses every finished run. ``OUT/reports/`` gets ``README.md``, the plots and
``results.json`` (:mod:`updetr.experiment_report`), all generated from the runs' ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .config import Config, ConfigError
from .demo import (
    BUDGET_LIST_FIELDS,
    DemoBudget,
    apply_budget_overrides,
    cache_labelled_features,
    common_overrides,
    finetune_config,
    prepare_data,
    pretrain_config,
    train_stage,
)
from .experiment_plan import Run, SeedPlan, length_points
from .experiment_report import write_experiment_report
from .stages import Job, is_done, parallel_slots, run_jobs, stage_dir

log = logging.getLogger(__name__)

# images per second of one stage process, measured (src/updetr/stage_rates.json names each rate's source)
RATES_FILE = Path(__file__).with_name("stage_rates.json")
RATE_NAMES = ("finetune", "pretrain", "eval", "cache", "finetune_uncached", "pretrain_uncached", "pretrain_trained_cnn",
              "eval_uncached", "oneshot", "oneshot_eval", "oneshot_uncached", "oneshot_eval_uncached", "panoptic_mask",
              "panoptic_eval")


def stage_rates(path: Path = RATES_FILE) -> dict[str, float]:
    """The measured stage rates (images per second) the time-left estimate weighs runs with."""
    try:
        rates = json.loads(path.read_text())["rates"]
        out = {name: float(rates[name]["images_per_s"]) for name in RATE_NAMES}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a stage-rates file with {', '.join(RATE_NAMES)} ({err!r})") from None
    bad = [name for name, value in out.items() if not value > 0]
    if bad:
        raise ConfigError(f"{path}: rates must be > 0 images/s: {', '.join(bad)}")
    return out


def quick_budget() -> DemoBudget:
    """``DemoBudget.quick()`` shrunk further: the whole protocol for 2 seeds in about 40 s on 2 CPU cores.

    Half the images, F = 1, and P = 2 so that the pre-training length has two points.
    """
    quick = DemoBudget.quick()
    return replace(quick, num_train=max(4, quick.num_train // 2), num_unlabeled=max(4, quick.num_unlabeled // 2),
                   pretrain_epochs=2, finetune_epochs=1, eval_points=1)


# The protocol's default differs from the demo's in three fields, so that 3 seeds of every table fit in about two
# hours on 2 cores: 1,600 labelled images (the demo's 3,200 would take about 3 h) with F = 6 fine-tuning epochs, so
# that the 2F schedule sees as many samples as the demo's arms, and P = 2 pre-training epochs (most of the
# pre-training time is Table 6's two pre-trainings with a trained CNN).
EXPERIMENT_DEFAULTS = ("num_train=1600", "finetune_epochs=6", "pretrain_epochs=2")


def experiment_budget(quick: bool = False, overrides: list[str] | None = None) -> DemoBudget:
    """The default (the demo's with ``EXPERIMENT_DEFAULTS``) or quick budget, then ``--budget FIELD=VALUE`` items."""
    for item in overrides or []:
        if item.partition("=")[0].strip() == "seed":
            raise ConfigError(f"--budget {item!r}: the protocol sets the seed of every run (0..N-1); use --seeds N")
    base = quick_budget() if quick else apply_budget_overrides(DemoBudget(), list(EXPERIMENT_DEFAULTS))
    return apply_budget_overrides(base, list(overrides or []))


def default_seeds(quick: bool = False) -> int:
    """Seeds the protocol runs when ``--seeds`` is not given."""
    return 2 if quick else 3


def experiment_command(budget: DemoBudget, seeds: int, quick: bool = False) -> str:
    """The ``updetr experiment`` command line (output folder aside) that runs ``budget`` for ``seeds`` seeds."""
    base = experiment_budget(quick)
    words = ["updetr", "experiment"] + (["--quick"] if quick else [])
    if seeds != default_seeds(quick):
        words += ["--seeds", str(seeds)]
    for f in fields(DemoBudget):
        value, default = getattr(budget, f.name), getattr(base, f.name)
        if f.name == "seed" or value == default:
            continue
        if f.name in BUDGET_LIST_FIELDS and tuple(value[:len(default)]) == tuple(default):
            items = [str(v) for v in value[len(default):]]  # config overrides appended to the default ones
        else:
            items = [json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))]
        words += [w for item in items for w in ("--budget", f"{f.name}={item}")]
    return " ".join(shlex.quote(w) for w in words)


@dataclass
class ExperimentResult:
    report_dir: Path
    readme: str
    results: dict
    plans: list[SeedPlan]
    seconds: float


def pretrain_variants(base: Config, pretrain_epochs: int) -> dict[str, tuple[str, int, list[str]]]:
    """Name -> (label, epochs, settings) of every pre-training the tables need.

    Each factor is set explicitly, so a budget override cannot silently change a row's meaning;
    equal resolved configs still share one stage. A trained CNN gets the transformer's lr, as in
    the paper's code (``lr_backbone = 0 if fre_cnn else lr``); a frozen one keeps the preset's.
    """
    m = base.pretrain.num_patches
    frozen = ["pretrain.freeze_backbone=true", f"optim.lr_backbone={base.optim.lr_backbone}"]
    trained = ["pretrain.freeze_backbone=false", f"optim.lr_backbone={base.optim.lr}"]
    recon, no_recon = ["pretrain.feature_reconstruction=true"], ["pretrain.feature_reconstruction=false"]
    mask, no_mask = ["pretrain.attention_mask=true"], ["pretrain.attention_mask=false"]
    p = pretrain_epochs
    variants = {
        "default": (f"default: M={m}, frozen CNN, reconstruction, mask", p, frozen + recon + mask),
        "single_patch": ("M=1", p, frozen + recon + mask + ["pretrain.num_patches=1"]),
        "unfrozen_no_recon": ("(a) trained CNN, no reconstruction", p, trained + no_recon + mask),
        "frozen_no_recon": ("(b) frozen CNN, no reconstruction", p, frozen + no_recon + mask),
        "unfrozen_recon": ("(c) trained CNN, reconstruction", p, trained + recon + mask),
        "no_mask": ("no attention mask", p, frozen + recon + no_mask),
    }
    for e in length_points(p):
        if e != p:
            variants[f"length_{e}"] = (f"length {e} of {p}", e, frozen + recon + mask)
    return variants


# the order runs are executed in: the headline comparison first (for every seed), then the ablations
FINETUNE_ORDER = ("detr_F", "default_F", "detr_2F", "default_2F", "single_patch_F", "unfrozen_no_recon_F",
                  "frozen_no_recon_F", "unfrozen_recon_F", "no_mask_F")


def plan_seed(root: Path, budget: DemoBudget, data_dir: Path, device: str) -> SeedPlan:
    """Build (without running) every run of ``budget.seed``; configuration errors surface here."""
    common = common_overrides(data_dir, budget, device)
    base = pretrain_config(budget, common, budget.pretrain_epochs, [])
    pretrain: dict[str, Run] = {}
    for name, (label, epochs, extra) in pretrain_variants(base, budget.pretrain_epochs).items():
        cfg = pretrain_config(budget, common, epochs, extra)
        cfg.check_query_groups()
        pretrain[name] = Run(name, budget.seed, "pretrain", f"UP-DETR pre-training ({label}; {epochs} ep)", cfg,
                             stage_dir(root, "pretrain", cfg.to_dict()), epochs)
    f = budget.finetune_epochs
    finetune: dict[str, Run] = {}
    for mult in (1, 2):
        cfg = finetune_config(budget, common, mult * f, "")
        name = "detr_F" if mult == 1 else "detr_2F"
        finetune[name] = Run(name, budget.seed, "detr", f"DETR fine-tuning ({mult * f} ep)", cfg,
                             stage_dir(root, "detr", cfg.to_dict()), mult * f)
    for pre_name, pre in pretrain.items():
        for mult in (1, 2) if pre_name == "default" else (1,):
            cfg = finetune_config(budget, common, mult * f, str(pre.path / "checkpoint.pth"))
            name = f"{pre_name}_{'F' if mult == 1 else '2F'}"
            label = f"UP-DETR fine-tuning ({mult * f} ep) after pre-training {pre.label.split(' ', 2)[2]}"
            finetune[name] = Run(name, budget.seed, "updetr", label, cfg, stage_dir(root, "updetr", cfg.to_dict()),
                                 mult * f)
    # Table 3: one-shot detection on the benchmark's seen / unseen split, the fine-tuning recipe for F epochs,
    # from scratch (the paper's DETR row) and from the default pre-training (keeps its patch -> query projection).
    # Table 4: panoptic segmentation as DETR trains it, from the same two starts: stage 1, the detector on the
    # segments' boxes (things and stuff) for F epochs; stage 2, that detector frozen and the mask head trained for
    # the paper's 25 / 300 of it (at least one epoch), on pixels (the mask head reads layers 1-3)
    oneshot: dict[str, Run] = {}
    panoptic: dict[str, Run] = {}
    mask_epochs = panoptic_mask_epochs(f)
    for name, init, label in (("detr", "", "from scratch (DETR)"),
                              ("updetr", str(pretrain["default"].path / "checkpoint.pth"), "from UP-DETR pre-training")):
        cfg = finetune_config(budget, common, f, init)
        oneshot[name] = Run(name, budget.seed, "oneshot", f"one-shot training ({f} ep) {label}", cfg,
                            stage_dir(root, "oneshot", cfg.to_dict()), f)
        stage1_cfg = cfg.override(["panoptic.stage=1"])
        stage1 = Run(f"{name}_1", budget.seed, "panoptic1", f"panoptic stage 1 ({f} ep, boxes) {label}", stage1_cfg,
                     stage_dir(root, "panoptic1", stage1_cfg.to_dict()), f)
        mask_cfg = finetune_config(budget, common, mask_epochs, str(stage1.path / "checkpoint.pth")).override(
            ["data.cache_features=false", f"eval_every={mask_epochs}", "panoptic.stage=2"])
        panoptic[f"{name}_1"] = stage1
        panoptic[f"{name}_2"] = Run(f"{name}_2", budget.seed, "panoptic2",
                                    f"panoptic stage 2 ({mask_epochs} ep, mask head) {label}", mask_cfg,
                                    stage_dir(root, "panoptic2", mask_cfg.to_dict()), mask_epochs)
    return SeedPlan(budget.seed, data_dir, pretrain, finetune, oneshot, panoptic)


def panoptic_mask_epochs(finetune_epochs: int) -> int:
    """Stage-2 (mask head) epochs for F detector epochs: DETR's 25 for 300, at least 1."""
    return max(1, round(finetune_epochs * 25 / 300))


def execution_order(plans: list[SeedPlan]) -> list[Run]:
    """Unique runs (by stage folder), each after the pre-training it starts from; RQ1 for all seeds first."""
    ordered: list[Run] = []
    seen: set[Path] = set()

    def add(run: Run) -> None:
        if run.path not in seen:
            seen.add(run.path)
            ordered.append(run)

    def pretrain_of(plan: SeedPlan, name: str) -> str | None:
        base = name.rsplit("_", 1)[0]
        return base if base in plan.pretrain else None

    for group in (FINETUNE_ORDER[:4], "oneshot", None):
        for plan in plans:
            if group == "oneshot":  # after RQ1, whose default pre-training the UP-DETR runs start from
                for run in (*plan.oneshot.values(), *plan.panoptic.values()):  # panoptic: stage 1 before stage 2
                    add(run)
                continue
            names = list(group or FINETUNE_ORDER[4:] + tuple(sorted(n for n in plan.finetune if n.startswith("length_"))))
            for name in names:
                pre = pretrain_of(plan, name)
                if pre is not None:
                    add(plan.pretrain[pre])
                add(plan.finetune[name])
    return ordered


def nominal_seconds(run: Run, budget: DemoBudget, rates: dict[str, float] | None = None) -> float:
    """A run's cost at the measured stage rates (:func:`stage_rates`); only its ratio to other runs' costs matters."""
    r = rates or stage_rates()
    cached = run.cfg.data.cache_features
    if run.kind == "pretrain":
        if not run.cfg.pretrain.freeze_backbone:
            return run.epochs * budget.num_unlabeled / r["pretrain_trained_cnn"]
        if not cached:
            return run.epochs * budget.num_unlabeled / r["pretrain_uncached"]
        return run.epochs * budget.num_unlabeled / r["pretrain"] + budget.num_unlabeled / r["cache"]
    every = max(1, run.cfg.eval_every)
    evals = run.epochs // every + (1 if run.epochs % every else 0)
    if run.kind == "panoptic2":  # on pixels, the CNN's intermediate layers and the mask head at 1/4 resolution
        return run.epochs * budget.num_train / r["panoptic_mask"] + evals * budget.num_val / r["panoptic_eval"]
    if run.kind == "oneshot":
        train_rate, eval_rate = ((r["oneshot"], r["oneshot_eval"]) if cached
                                 else (r["oneshot_uncached"], r["oneshot_eval_uncached"]))
        # cached: the maps come from the seed's features job (cache_seconds), as for the detection runs
        return run.epochs * budget.num_train / train_rate + evals * budget.num_val / eval_rate
    if not cached:
        return run.epochs * budget.num_train / r["finetune_uncached"] + evals * budget.num_val / r["eval_uncached"]
    # the CNN maps of the labelled images come from the seed's features job (cache_seconds), read from the store here
    return run.epochs * budget.num_train / r["finetune"] + evals * budget.num_val / r["eval"]


def cache_seconds(budget: DemoBudget, rates: dict[str, float] | None = None) -> float:
    """The features job of one seed: the CNN pass over the train images, their mirrors and the val images."""
    return (2 * budget.num_train + budget.num_val) / (rates or stage_rates())["cache"]


def experiment_jobs(plans: list[SeedPlan], runs: list[Run], progress: bool) -> list[Job]:
    """The runs not yet done as :class:`~updetr.stages.Job` s, each after the run whose checkpoint it starts from
    and, when it trains on cached CNN maps of the labelled images (every run but the pre-trainings, which read the
    unlabelled ones), after its seed's job that computes those maps."""
    todo = [r for r in runs if not is_done(r.path)]
    names = {str(r.path) for r in todo}

    def reads_labelled_maps(run: Run) -> bool:
        return run.kind != "pretrain" and run.cfg.data.cache_features

    jobs: list[Job] = []
    features: dict[int, str] = {}
    for plan in plans:
        if any(r.seed == plan.seed and reads_labelled_maps(r) for r in todo):
            features[plan.seed] = f"features seed {plan.seed}"
            jobs.append(Job(features[plan.seed], cache_labelled_features, (plan.finetune["detr_F"].cfg, progress)))
    for run in todo:
        after = [str(Path(run.cfg.init_from).parent)] if run.cfg.init_from else []
        if reads_labelled_maps(run):
            after.append(features[run.seed])
        label = f"seed {run.seed}: {run.label}"
        jobs.append(Job(str(run.path), train_stage, (run.path, run.task, run.cfg, progress, label),
                        tuple(a for a in after if a in names or a in features.values())))
    return jobs


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def run_experiment(output: str | Path = "experiment", *, budget: DemoBudget | None = None, quick: bool = False,
                   seeds: int | None = None, device: str = "auto", progress: bool = True) -> ExperimentResult:
    """Run (or reuse) every run of the protocol for seeds ``0..seeds-1`` and write ``OUT/reports/``.

    ``seeds`` defaults to 3 (2 with ``quick``); ``budget`` defaults to ``experiment_budget(quick)``.
    """
    start = time.perf_counter()
    budget = budget or experiment_budget(quick)
    seeds = seeds if seeds is not None else default_seeds(quick)
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be a whole number >= 1, got {seeds!r}")
    if budget.finetune_epochs < 1 or budget.pretrain_epochs < 1 or budget.eval_points < 1:
        raise ConfigError("--budget finetune_epochs, pretrain_epochs and eval_points must be >= 1, got "
                          f"{budget.finetune_epochs}, {budget.pretrain_epochs}, {budget.eval_points}")
    root = Path(output)
    budgets = [replace(budget, seed=s) for s in range(seeds)]
    # every config is built once with placeholder inputs, so a bad --budget fails before anything runs
    dry = plan_seed(root, budget, root / "stages" / "data", device)
    total_inputs = len(budgets)
    n = total_inputs * (1 + len(execution_order([dry])))
    root.mkdir(parents=True, exist_ok=True)

    log.info("experiment: %d seeds, fine-tuning F=%d / 2F=%d epochs, pre-training P=%d epochs (length points %s), "
             "output %s", seeds, budget.finetune_epochs, 2 * budget.finetune_epochs, budget.pretrain_epochs,
             ", ".join(map(str, length_points(budget.pretrain_epochs))), root)
    processes, threads = parallel_slots(device, budget.workers)
    rates = stage_rates()
    nominal = seeds * (sum(nominal_seconds(r, budget, rates) for r in execution_order([dry])) + cache_seconds(budget, rates))
    log.info("experiment: %d runs; about %s from scratch on 2 idle CPU cores (%d at a time)", n,
             _duration(nominal / processes), processes)
    plans = []
    for k, b in enumerate(budgets, 1):
        log.info("[%d/%d] seed %d: embedded benchmark ...", k, n, b.seed)
        data_dir = prepare_data(root, b, progress)
        plans.append(plan_seed(root, b, data_dir, device))

    runs = execution_order(plans)
    cached = sum(is_done(r.path) for r in runs)
    log.info("experiment: %d runs (%d seeds x benchmark, %d trainings, %d of them already finished)",
             n, total_inputs, len(runs), cached)
    if processes > 1:
        log.info("experiment: runs go %d at a time, each in its own process with %d thread%s", processes, threads,
                 "" if threads == 1 else "s")
    jobs = experiment_jobs(plans, runs, progress and processes == 1)
    # nominal cost of every job still to run (the seeds' CNN-feature jobs too), so that the time left is the
    # measured time so far scaled by the share of the nominal work done
    left = {str(r.path): nominal_seconds(r, budget, rates) for r in runs if not is_done(r.path)}
    run_names = set(left)
    left.update({job.name: cache_seconds(budget, rates) for job in jobs if job.name not in run_names})  # features jobs
    clock = {"nominal": 0.0, "start": time.perf_counter()}

    def finished(name: str, result) -> None:
        clock["nominal"] += left.pop(name, 0.0)
        if name not in run_names:
            return
        spent = time.perf_counter() - clock["start"]
        rest = sum(left.values()) * spent / clock["nominal"]
        done = len(run_names) - sum(1 for key in left if key in run_names)
        log.info("experiment: %d of %d runs finished (%s); about %s left", done, len(run_names), name,
                 _duration(rest))

    run_jobs(jobs, processes=processes, threads=threads, on_done=finished)

    report_dir = root / "reports"
    readme, results = write_experiment_report(report_dir, root, plans, budget,
                                              command=experiment_command(budget, seeds, quick))
    seconds = time.perf_counter() - start
    log.info("experiment: report in %s (%s)", report_dir, _duration(seconds))
    return ExperimentResult(report_dir, readme, results, plans, seconds)
