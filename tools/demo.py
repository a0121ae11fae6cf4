"""The embedded-default comparison: SyncSGD, PR-SGD and RI-SGD on scikit-learn's digits.

    python -m tools.demo                 # what `make demo` runs: one seed, 4 CPU ranks
    python -m tools.demo --seeds 0 1 2   # the acceptance comparison, averaged over seeds
    risgd-demo --runs-dir demo-out         # installed: from any directory (shards/ and demo-out/ go there)

The runs are one real ``deepspeed --num_gpus N train.py --plan ...`` launch (N CPU ranks with gloo
on a machine without GPUs): one process group trains them one after another. Finished runs (with
a summary.json) are kept, so an interrupted demo picks up where it stopped. Prints the comparison
table and writes the plots next to the runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from risgd_common.cli import Parser
from risgd_common.install import MissingExtra, command, need
from risgd_trainer.naming import demo_run_name
from risgd_trainer.run_config import RecipeError, check_same_experiment, load_recipe, resolve_run
from risgd_trainer.train import check_extras, locate_recipe

from . import compare
from .launch import launch


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=command("tools.demo"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/digits.yaml",
                        help="recipe file or bundled recipe's name (default recipes/digits.yaml: the bundled digits)")
    parser.add_argument("--ranks", type=int, default=4, help="ranks per run (default 4)")
    parser.add_argument("--tau", type=int, default=None, help="local steps per round (default: the recipe's tau)")
    parser.add_argument("--mus", type=float, nargs="+", default=[0.25, 0.5], help="RI-SGD redundancies")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    parser.add_argument("--runs-dir", default="runs/demo", help="where the runs go (default runs/demo)")
    parser.add_argument("overrides", nargs="*", help="extra key=value recipe overrides for every run")
    args = parser.parse_args(argv)

    runs_dir = os.path.abspath(args.runs_dir)  # the trainer may run elsewhere (a checkout's root)
    try:  # the runs are named after the recipe's name
        recipe = os.path.abspath(locate_recipe(args.recipe))
        cfg = load_recipe(recipe, args.overrides)
        check_extras(cfg)  # before a launch: what the runs and the plots need is installed
        need("matplotlib", "plotting the demo's runs")
    except (RecipeError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recipe_name = cfg["name"]
    grid = [("sync", 0.0), ("prsgd", 0.0)] + [("risgd", mu) for mu in args.mus]
    run_dirs, plan = [], []
    common = [f"runs_dir={runs_dir}", "wandb.group=digits-demo"]
    started = time.perf_counter()
    for seed in args.seeds:
        for algorithm, mu in grid:
            name = demo_run_name(recipe_name, algorithm, mu, seed)
            run_dir = os.path.join(runs_dir, name)
            run_dirs.append(run_dir)
            tau = [] if args.tau is None else [f"tau={args.tau}"]
            # the extra overrides last: they win, as on a command line of their own
            entry = [f"algorithm={algorithm}", f"mu={mu}", *tau, f"seed={seed}", f"run_name={name}", *args.overrides]
            try:  # a run of another experiment under this name (another --tau, other overrides): refused, not kept
                check_same_experiment(run_dir, resolve_run(recipe, [*common, *entry], args.ranks).cfg)
            except RecipeError as e:  # the trainer's words name its keys; the demo's option is --runs-dir
                said = str(e).replace("pick a new run_name= or runs_dir=", "give this comparison a --runs-dir DIR")
                print(f"error: {said}", file=sys.stderr)
                return 2
            if os.path.exists(os.path.join(run_dir, "summary.json")):
                print(f"[demo] {name}: done already, kept")
                continue
            plan.append(entry)
    if plan:  # one launch, one process group for all the runs (a launch costs ~30 s of start-up)
        os.makedirs(runs_dir, exist_ok=True)
        log = os.path.join(args.runs_dir, "demo.log")
        print(f"[demo] {len(plan)} runs, {args.ranks} ranks each, in one launch (its output: {log}); the run "
              "training now, its step and the time left:", flush=True)
        launch(recipe, args.ranks, common, log, plan=plan)
    print(f"[demo] all runs in {time.perf_counter() - started:.0f} s\n")
    return compare.main(run_dirs + ["--out", args.runs_dir, "--force"])  # the demo's folder: its plots are its own


if __name__ == "__main__":
    sys.exit(main())
