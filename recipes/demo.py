"""The embedded-default comparison: SyncSGD, PR-SGD and RI-SGD on scikit-learn's digits.

    python -m recipes.demo                 # what `make demo` runs: one seed, 4 CPU ranks
    python -m recipes.demo --seeds 0 1 2   # the acceptance comparison, averaged over seeds

Each run is a real ``deepspeed --num_gpus N train.py ...`` launch (N CPU ranks with gloo on a
machine without GPUs). Finished runs (with a summary.json) are kept, so an interrupted demo picks
up where it stopped. Prints the comparison table and writes the plots next to the runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

from . import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe: str, ranks: int, overrides: list[str], log_path: str) -> None:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(_free_port()), os.path.join(ROOT, "train.py"), "--recipe", recipe, *overrides]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:  # 2: the run refused its input (one line in the log); 1: it failed
        print(f"error: run failed (exit {proc.returncode}): see {log_path}", file=sys.stderr)
        raise SystemExit(2 if proc.returncode == 2 else 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/digits.yaml", help="recipe (default recipes/digits.yaml)")
    parser.add_argument("--ranks", type=int, default=4, help="ranks per run (default 4)")
    parser.add_argument("--tau", type=int, default=None, help="local steps per round (default: the recipe's tau)")
    parser.add_argument("--mus", type=float, nargs="+", default=[0.25, 0.5], help="RI-SGD redundancies")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    parser.add_argument("--runs-dir", default="runs/demo", help="where the runs go (default runs/demo)")
    parser.add_argument("overrides", nargs="*", help="extra key=value recipe overrides for every run")
    args = parser.parse_args(argv)

    plan = [("sync", 0.0), ("prsgd", 0.0)] + [("risgd", mu) for mu in args.mus]
    run_dirs = []
    started = time.perf_counter()
    for seed in args.seeds:
        for algorithm, mu in plan:
            name = f"digits-{algorithm}" + (f"-mu{mu:g}" if algorithm == "risgd" else "") + f"-s{seed}"
            run_dir = os.path.join(args.runs_dir, name)
            run_dirs.append(run_dir)
            if os.path.exists(os.path.join(run_dir, "summary.json")):
                print(f"[demo] {name}: done already, kept")
                continue
            os.makedirs(run_dir, exist_ok=True)
            t0 = time.perf_counter()
            print(f"[demo] {name}: {args.ranks} ranks ...", flush=True)
            tau = [] if args.tau is None else [f"tau={args.tau}"]
            launch(args.recipe, args.ranks, [f"algorithm={algorithm}", f"mu={mu}", *tau,
                                             f"seed={seed}", f"runs_dir={args.runs_dir}", f"run_name={name}",
                                             "wandb.group=digits-demo", *args.overrides],
                   os.path.join(args.runs_dir, f"{name}.log"))
            print(f"[demo] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"[demo] all runs in {time.perf_counter() - started:.0f} s\n")
    return compare.main(run_dirs + ["--out", args.runs_dir])


if __name__ == "__main__":
    sys.exit(main())
