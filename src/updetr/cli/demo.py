"""``updetr demo`` and ``updetr experiment``: the paper's comparison offline, and its tables over seeds."""

from __future__ import annotations

import argparse

from ..demo import DemoBudget, apply_budget_overrides, run_demo
from ..experiment import experiment_budget, run_experiment
from .common import CommonSubparsers, setup_logging

__all__ = ["cmd_demo", "cmd_experiment", "register"]


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    budget = DemoBudget.quick() if args.quick else DemoBudget()
    budget = apply_budget_overrides(budget, args.budget)
    run_demo(args.output, device=args.device or "auto", progress=not args.no_progress, budget=budget)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    setup_logging(0, args.verbose)
    budget = experiment_budget(args.quick, args.budget)
    result = run_experiment(args.output, budget=budget, quick=args.quick, seeds=args.seeds, device=args.device or "auto",
                            progress=not args.no_progress)
    print(f"report: {result.report_dir / 'README.md'}")
    return 0


def register(sub: CommonSubparsers) -> None:
    """Add ``demo`` and ``experiment`` to ``updetr``'s subcommands."""
    p = sub.add_parser("demo", help="the main job: the paper's comparison on the embedded benchmark, offline")
    p.add_argument("--output", default="demo")
    p.add_argument("--quick", action="store_true", help="a tiny budget (seconds), to check the pipeline")
    p.add_argument("--budget", action="append", default=[], metavar="FIELD=VALUE",
                   help="change the demo budget (repeatable), e.g. finetune_epochs=12, seed=1, finetune=optim.lr=5e-4")
    p.add_argument("--device")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("experiment", help="the paper's tables at small scale, mean ± std over seeds (reuses demo stages)")
    p.add_argument("--output", default="experiment")
    p.add_argument("--quick", action="store_true", help="a tiny budget and 2 seeds (about a minute), to check the protocol")
    p.add_argument("--seeds", type=int, metavar="N", help="seeds 0..N-1 (default 3; 2 with --quick)")
    p.add_argument("--budget", action="append", default=[], metavar="FIELD=VALUE",
                   help="change the budget (repeatable), as for demo, e.g. finetune_epochs=4, pretrain_epochs=4")
    p.add_argument("--device")
    p.set_defaults(func=cmd_experiment)
