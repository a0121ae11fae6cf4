"""The RI-SGD paper, experiment by experiment: re-run every experiment, write a report with verdicts.

    python -m tools.paper                      # `make paper`: the embedded digits, 4 and 8 ranks (~90 min on 2 cores)
    python -m tools.paper --quick              # 1 seed, 200-step runs (6-12 min measured on 2 cores)
    python -m tools.paper --plan-only          # the planned runs and an estimate of the time
    python -m tools.paper --report-only        # rebuild the report from the finished runs
    python -m tools.paper --retrain-stale      # re-train the runs another engine trained
    python -m tools.paper --recipe recipes/cifar10_resnet44.yaml   # the paper's own setup (GPUs, the data)

Experiments: Fig. 2 (mu against SyncSGD, label-sorted and iid), Appendix A (the tau sweep and no
averaging until the end), Fig. 3 (full redundancy against cooperative SGD), Fig. 4 (a 4x batch),
section 4.4 (failed workers), Theorem 4.2's residual error (divergence before averaging, also at an
equal per-rank batch), homogeneous against heterogeneous mu, RI-SGD at equal compute (the batch split)
and the number of workers p (through the node level, and p = 8 in a launch of 8 ranks). The runs of
one world size go into one ``deepspeed`` launch (``train.py --plan``: one process group trains them one
after another). Then the sequential rule (``tools/paper/verdict.py``): a check still inconclusive gets
more seeds for the settings it compares (looks at 3, 5 and 8 seeds), within --extra-runs runs, one
launch per stage. A run that has finished is never trained again, so re-running the command resumes,
replays the rule's stages and rebuilds the report. Writes ``OUT/paper.md``, ``OUT/paper.json`` and the
PNGs next to them.

Each run it launches gets the stamp of the engine that trains it (``RUN/paper_engine.json``:
:mod:`tools.paper.engine_stamp`). A finished run whose stamp names another engine, or that has none, is
*stale*: the report marks it, and ``--retrain-stale`` moves it aside (``RUN.stale-TIME``) and trains
it again.

Extra ``key=value`` arguments are recipe overrides for every run (e.g. ``data.shards=DIR``); the keys
the grid sets (algorithm, mu, tau, steps, seed, data.partition, ...) are refused. Exit status: 0 done,
2 bad input (one line ``error: ...``), 1 a run or the report failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, replace

from risgd_data.errors import DataError
from risgd_recipes.bundled import bundled_recipe
from risgd_trainer.run_config import RecipeError, load_recipe, resolve_run

from .. import compare
from ..launch import ROOT, launch
from . import engine_stamp as stamp
from . import verdict as V
from .grid import GRID_KEYS, GRIDS, WIDE_P, Grid, GridError, Setting, make_grid

DEFAULT_RECIPE = "recipes/digits.yaml"
# Seconds on an idle 2-core machine for digits (ResNet-8) with 4 CPU ranks, measured on the demo's runs;
# a grid with finished runs rescales them by measured / predicted, and so does the progress line of a launch
# once its first run has finished (Progress).
LAUNCH_S, RUN_SETUP_S, STEP_S, SAMPLE_S, ALLREDUCE_S, EVAL_S = 40.0, 1.0, 0.008, 0.00045, 0.012, 0.3
# How much slower than those constants a machine has been measured to run a grid: `--quick` took 6 min 23 s on
# the idle 2-core machine the constants come from (estimated 6.6 min) and 671 s on another 2-core machine
# (issue 46): 671 / 383 = 1.75. An estimate from the constants alone is stated as that range.
SLOWER_MEASURED = 1.75
# Runs the sequential rule may add to the full grid by default (about 45 s each here): what keeps `make
# paper` within 90 min on 2 cores with the grid's 3 seeds and the 8-rank launch of p = 8.
EXTRA_RUNS = 20


class BadInput(Exception):
    """A command-line problem: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as every risgd command
        raise BadInput(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # `python -m tools.paper` runs the package's __main__.py: the usage line keeps the command's name
    prog = "paper.py" if os.path.basename(sys.argv[0]) == "__main__.py" else None
    p = _Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe (default {DEFAULT_RECIPE})")
    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="full: the paper's grid at the recipe's iterations (default); quick: 1 seed, shorter runs, "
                        "fewer taus; test: 2 ranks, 20-step runs (the test suite's)")
    p.add_argument("--quick", action="store_true", help="the same as --grid quick")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds for every experiment (default: the grid's; full: 3, the fewest a verdict is decided "
                        "on; quick and test: 1, so every measured check is inconclusive)")
    p.add_argument("--ranks", type=int, default=None, help="ranks per run (default 4; 2 for --grid test)")
    p.add_argument("--steps", type=int, default=None,
                   help="iterations per run (default: the recipe's for full, a fifth for quick, 20 for test); "
                        "a multiple of every tau of the sweep")
    p.add_argument("--extra-runs", type=int, default=None,
                   help=f"the most runs the sequential rule may add for inconclusive checks (seeds "
                        f"{' -> '.join(map(str, V.LOOKS))}, the verdict module's rule; default {EXTRA_RUNS} for the "
                        "full grid, 0 for quick and test; 0 turns it off)")
    p.add_argument("--max-ranks", type=int, default=WIDE_P,
                   help=f"the largest launch the grid may use (default {WIDE_P}: the number-of-workers experiment's "
                        f"p={WIDE_P} gets a launch of {WIDE_P} ranks; below {WIDE_P} it is left out)")
    p.add_argument("--runs-dir", default=None, help="where the runs go (default runs/paper/NAME-GRID-pRANKS)")
    p.add_argument("--out", default=None,
                   help="where paper.md, paper.json and the PNGs go (default reports/; reports/NAME/ for a recipe "
                        "other than digits)")
    p.add_argument("--plan-only", action="store_true", help="print the planned runs and the estimated time; run "
                                                             "nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the finished runs; train "
                                                               "nothing")
    p.add_argument("--retrain-stale", action="store_true",
                   help="move aside (RUN.stale-TIME) and train again every finished run that another engine trained "
                        "or that carries no engine stamp (default: keep them and mark them stale in the report)")
    p.add_argument("--only", default=None, metavar="KEY[,KEY...]",
                   help="run and report only these experiments (keys: fig2, tau, diversity, saturation, failures, "
                        "theory, homogeneous, equalcompute, workers); their runs are the full grid's, so a later "
                        "run without --only reuses them")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides for every run (not the grid's keys)")
    args = p.parse_args(argv)
    if args.quick:
        if args.grid not in (None, "quick"):
            raise BadInput(f"--quick contradicts --grid {args.grid}: give one of them")
        args.grid = "quick"
    args.grid = args.grid or "full"
    if args.plan_only and args.report_only:
        raise BadInput("--plan-only and --report-only exclude each other: give one")
    if args.report_only and args.retrain_stale:
        raise BadInput("--report-only trains nothing, --retrain-stale trains the stale runs: give one")
    for item in args.overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise BadInput(f"override '{item}' must look like key=value (e.g. data.shards=DIR)")
        if key in GRID_KEYS or any(key.startswith(k + ".") for k in GRID_KEYS):
            raise BadInput(f"override '{item}': the paper grid sets {key} for every run; use --steps, --seeds, "
                           "--runs-dir or --grid instead, or run train.py yourself")
    if args.ranks is not None and args.ranks < 2:
        raise BadInput(f"--ranks {args.ranks} is invalid: the paper's comparisons need at least 2 ranks")
    if args.extra_runs is not None and args.extra_runs < 0:
        raise BadInput(f"--extra-runs {args.extra_runs} is invalid: use 0 (off) or a positive number of runs")
    if args.max_ranks < 2:
        raise BadInput(f"--max-ranks {args.max_ranks} is invalid: use at least 2")
    if args.steps is not None and args.steps < 1:
        raise BadInput(f"--steps {args.steps} is invalid: use a positive number of iterations")
    return args


# -- planning ---------------------------------------------------------------------------------------

def predicted_seconds(setting: Setting, grid: Grid) -> float:
    """A run's wall-clock by the digits constants above (rescaled by finished runs, see estimate)."""
    world = setting.world(grid.ranks)  # 4 ranks share the 2 cores the constants were measured on
    per_step = STEP_S * max(1.0, world / 4) + SAMPLE_S * setting.per_rank_batch(grid.ranks) * world / 4
    rounds = setting.steps if setting.algorithm == "sync" else setting.steps // setting.tau
    if setting.node_size > 1:  # a node's ranks all-reduce their gradients every step
        rounds += setting.steps
    evals = -(-setting.steps // max(grid.eval_every, setting.tau if setting.algorithm != "sync" else 1))
    return RUN_SETUP_S + setting.steps * per_step + rounds * ALLREDUCE_S + evals * EVAL_S


def estimate(grid: Grid, pending: list[tuple[Setting, int]], finished: dict[str, dict],
             dataset: str) -> tuple[float | None, str]:
    """Seconds the pending runs will take, and how that was estimated."""
    done = [(s, run) for s, run in ((s, finished.get(s.run_name(seed))) for s, seed in grid.runs()) if run]
    if done:
        scale = sum(r["wall_seconds"] for _, r in done) / sum(predicted_seconds(s, grid) for s, _ in done)
        how = f"rescaled by {len(done)} finished run(s) of this grid (measured / predicted = {scale:.2f})"
    elif dataset == "digits":
        scale, how = 1.0, (f"digits constants measured on 2 idle cores; up to {SLOWER_MEASURED:g}x that measured on "
                           "another 2-core machine: the progress lines rescale it once a run has finished")
    else:
        return None, (f"no estimate for {dataset} before a run of this grid has finished (the built-in constants "
                      "are digits on 2 CPU cores); re-run --plan-only after the first runs")
    total = sum(predicted_seconds(s, grid) for s, _ in pending) * scale
    return (total + (LAUNCH_S if pending else 0.0)), how


def print_plan(grid: Grid, pending: list[tuple[Setting, int]], finished: dict[str, dict], dataset: str,
               stale: dict[str, str] | None = None, retrain: bool = False) -> None:
    stale = stale or {}
    uses: dict[str, list[str]] = {}
    for exp in grid.experiments():
        for s in exp.settings:
            for seed in exp.seeds_of(s):
                uses.setdefault(s.run_name(seed), []).append(exp.key)
    waiting = {s.run_name(seed) for s, seed in pending}
    print(f"{'run':<48} {'batch/rank':>10} {'steps':>6} {'status':<8} experiments")
    for s, seed in grid.runs():
        name = s.run_name(seed)
        status = "pending" if name in waiting else ("stale" if name in stale else "done")
        print(f"{name:<48} {s.per_rank_batch(grid.ranks):>10g} {s.steps:>6} "
              f"{status:<8} {', '.join(dict.fromkeys(uses[name]))}")
    seconds, how = estimate(grid, pending, finished, dataset)
    est = minutes(seconds, ranged=not any(finished.get(s.run_name(seed)) for s, seed in grid.runs()))
    worlds = sorted({s.world(grid.ranks) for s, _ in grid.runs()}, key=lambda r: (r != grid.ranks, r))
    where = (f"on {grid.ranks} ranks in one launch" if len(worlds) == 1 else
             "in one launch per world size: " + ", ".join(
                 f"{sum(s.world(grid.ranks) == r for s, _ in grid.runs())} on {r} ranks" for r in worlds))
    print(f"\n{len(grid.runs())} runs ({len(pending)} pending) {where}; estimated {est} ({how})")
    if stale:
        print(f"{len(stale)} finished run(s) trained by another engine or without an engine stamp (stale): "
              + ("re-trained by --retrain-stale (counted as pending)" if retrain
                 else "kept and marked in the report; --retrain-stale trains them again"))


def minutes(seconds: float | None, ranged: bool = False) -> str:
    """``6.6 min``; ``ranged``: the estimate from the constants alone, as the range measured across machines
    (``6.6-11.6 min``, :data:`SLOWER_MEASURED`)."""
    if seconds is None:
        return "unknown"
    return f"{seconds / 60:.1f}-{seconds * SLOWER_MEASURED / 60:.1f} min" if ranged else f"{seconds / 60:.1f} min"


class Progress(threading.Thread):
    """Prints each run as its summary.json appears (the launch's own output goes to its log), with the time
    left at this machine's pace: the predicted seconds of the runs still to come (``predicted``, by run
    directory) times measured / predicted of the runs finished so far."""

    def __init__(self, dirs: list[str], predicted: dict[str, float] | None = None):
        super().__init__(daemon=True)
        self.dirs, self.stop = dirs, threading.Event()
        self.predicted = predicted or {}
        self.left, self.measured = list(dirs), {}
        self.t0 = time.perf_counter()

    def finished(self, run_dir: str) -> str:
        """Takes ``run_dir`` as finished (its summary.json's wall_seconds) and returns its progress line."""
        self.left.remove(run_dir)
        try:
            with open(os.path.join(run_dir, "summary.json")) as f:
                self.measured[run_dir] = float(json.load(f)["wall_seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        line = (f"[paper] {len(self.dirs) - len(self.left)}/{len(self.dirs)} {os.path.basename(run_dir)} "
                f"({time.perf_counter() - self.t0:.0f} s")
        timed = [d for d in self.measured if self.predicted.get(d)]
        if self.left and timed and all(d in self.predicted for d in self.left):
            pace = sum(self.measured[d] for d in timed) / sum(self.predicted[d] for d in timed)
            left = pace * sum(self.predicted[d] for d in self.left)
            line += f"; about {left / 60:.1f} min left at this machine's pace, {pace:.2f}x the estimate"
        return line + ")"

    def run(self) -> None:
        while self.left and not self.stop.wait(5.0):
            for d in [d for d in self.left if os.path.exists(os.path.join(d, "summary.json"))]:
                print(self.finished(d), flush=True)


# -- the command ------------------------------------------------------------------------------------

@dataclass
class _State:
    """What the grid's runs are on disk: finished (summaries), pending, stale, directories by run name."""

    finished: dict
    pending: list
    stale: dict
    dirs: dict


def _survey(grid: Grid, recipe: str, common: list[str], engine: dict, retrain_stale: bool) -> _State:
    """Every planned run checked (and its directory compared) before any launch."""
    st = _State({}, [], {}, {})
    for setting, seed in grid.runs():
        ranks = setting.world(grid.ranks)
        run = resolve_run(recipe, [*common, *setting.overrides(seed)], ranks)
        name = setting.run_name(seed)
        st.dirs[name] = run.run_dir
        if not run.finished:
            st.pending.append((setting, seed))
            continue
        reason = stamp.stale_reason(stamp.read(run.run_dir), engine)
        if reason:
            st.stale[name] = reason
        if reason and retrain_stale:
            st.pending.append((setting, seed))
            continue
        with open(os.path.join(run.run_dir, "summary.json")) as f:
            st.finished[name] = json.load(f)
        if st.finished[name].get("world_size") != ranks:
            raise BadInput(f"{run.run_dir} was trained on {st.finished[name].get('world_size')} ranks, not {ranks}: "
                           "pick another --runs-dir")
    return st


def _train(grid: Grid, st: _State, recipe: str, common: list[str], runs_dir: str, engine: dict, dataset: str,
           what: str) -> int:
    """Train the pending runs: one launch per world size (the grid's first). Returns the launches made."""
    os.makedirs(runs_dir, exist_ok=True)
    moved = {}
    for s, seed in st.pending:
        name = s.run_name(seed)
        if name in st.stale:  # --retrain-stale: kept, out of the way
            moved[name] = f"{st.dirs[name]}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(st.dirs[name], moved[name])
        stamp.append(st.dirs[name], engine)  # before the launch: a run cut short keeps its engine's stamp
    if moved:
        first = _shown(next(iter(moved.values())))
        print(f"[paper] {len(moved)} stale run(s) moved aside to re-train them (e.g. {first})", flush=True)
    worlds = sorted({s.world(grid.ranks) for s, _ in st.pending}, key=lambda r: (r != grid.ranks, r))
    launches = 0
    for ranks in worlds:
        batch = [(s, seed) for s, seed in st.pending if s.world(grid.ranks) == ranks]
        log = os.path.join(runs_dir, "paper.log" if ranks == grid.ranks else f"paper-r{ranks}.log")
        seconds, how = estimate(grid, batch, st.finished, dataset)
        est = "" if seconds is None else f", estimated {minutes(seconds, ranged=not st.finished)} ({how})"
        print(f"[paper] {what}: {len(batch)} of {len(grid.runs())} runs to train, {ranks} ranks, one launch{est}; "
              f"log: {log}", flush=True)
        progress = Progress([os.path.join(runs_dir, s.run_name(seed)) for s, seed in batch],
                            {os.path.join(runs_dir, s.run_name(seed)): predicted_seconds(s, grid) for s, seed in batch})
        progress.start()
        try:  # one launch, one process group for every pending run of this world size
            launch(recipe, ranks, common, log, plan=[s.overrides(seed) for s, seed in batch])
        finally:
            progress.stop.set()
            progress.join()
            try:  # the engine changed while the launch ran: its runs say so too
                after = stamp.current()
                if not stamp.same(after, engine):
                    for s, seed in batch:
                        stamp.append(st.dirs[s.run_name(seed)], after)
            except OSError:
                pass
        launches += 1
    return launches


def _load(grid: Grid, runs_dir: str) -> dict[str, dict]:
    """The grid's finished runs (``compare.load_run``) with their engine stamps, by run name."""
    runs = {s.run_name(seed): compare.load_run(os.path.join(runs_dir, s.run_name(seed))) for s, seed in grid.runs()}
    for run in runs.values():
        run["engine"] = stamp.read(run["dir"])
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    try:
        args = parse_args(argv)
        recipe = args.recipe
        if not os.path.exists(recipe):  # a bundled recipe by name or as recipes/NAME.yaml, from anywhere
            recipe = bundled_recipe(recipe) or recipe
        recipe = os.path.abspath(recipe)
        cfg = load_recipe(recipe, args.overrides)
        ranks = args.ranks or (2 if args.grid == "test" else 4)
        grid = make_grid(args.grid, cfg, ranks, steps=args.steps, seeds=tuple(args.seeds) if args.seeds else None,
                         max_ranks=args.max_ranks)
        if args.only:
            keys = [e.key for e in grid.experiments()]
            only = tuple(k.strip() for k in args.only.split(",") if k.strip())
            unknown = [k for k in only if k not in keys]
            if unknown or not only:
                raise BadInput(f"--only {args.only}: {', '.join(unknown) or 'no key'} is not an experiment; "
                               f"use keys from {', '.join(keys)}")
            grid = replace(grid, only=tuple(k for k in keys if k in only))
        runs_dir = os.path.abspath(args.runs_dir or os.path.join("runs", "paper",
                                                                 f"{cfg['name']}-{grid.name}-p{ranks}"))
        out = args.out or ("reports" if cfg["data"]["dataset"] == "digits" else os.path.join("reports", cfg["name"]))
        common = [f"runs_dir={runs_dir}", f"eval_every={grid.eval_every}", "wandb.enabled=false",
                  f"wandb.group=paper-{cfg['name']}", *args.overrides]  # the user's overrides win
        extra_runs = args.extra_runs if args.extra_runs is not None else (EXTRA_RUNS if grid.name == "full" else 0)
        try:
            engine = stamp.current()
        except OSError as e:
            raise BadInput(f"cannot stamp the engine: {e}") from None
        st = _survey(grid, recipe, common, engine, args.retrain_stale)
    except (BadInput, RecipeError, GridError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dataset = cfg["data"]["dataset"]

    if args.plan_only:
        print_plan(grid, st.pending, st.finished, dataset, st.stale, args.retrain_stale)
        print(f"then up to {extra_runs} more run(s) where a check is inconclusive (the sequential rule: seeds "
              f"{' -> '.join(map(str, V.LOOKS))}; --extra-runs)")
        return 0
    if args.report_only and st.pending:
        name = st.pending[0][0].run_name(st.pending[0][1])
        print(f"error: {len(st.pending)} of {len(grid.runs())} runs are not finished (e.g. "
              f"{os.path.join(runs_dir, name)}): run the command without --report-only to train them", file=sys.stderr)
        return 2

    from . import report, sequential

    trained, launches, base_runs = len(st.pending), 0, len(grid.runs())
    try:
        if st.pending:
            launches += _train(grid, st, recipe, common, runs_dir, engine, dataset, "the grid")
        else:
            print(f"[paper] all {base_runs} runs are finished: no launch; rebuilding the report", flush=True)
        # the sequential rule: more seeds for the checks they can decide, look by look, within --extra-runs
        spent, stage = 0, 0
        while spent < extra_runs:
            analyses = report.analyse(grid, _load(grid, runs_dir), out, draw=False)
            steps, more = sequential.more_seeds(grid, analyses, extra_runs - spent)
            if not more:
                break
            wider = replace(grid, extra=grid.extra + tuple(more))
            st = _survey(wider, recipe, common, engine, args.retrain_stale)
            if st.pending and args.report_only:  # rebuild from what finished; train nothing
                print(f"[paper] --report-only: the sequential rule's next {len(more)} run(s) are not all finished: "
                      "the report stops at the look before", flush=True)
                break
            stage += 1
            grid, spent = wider, spent + len(more)
            looks = ", ".join(f"{st_.check[:60]}... {st_.seeds} -> {st_.look}" for st_ in steps[:3])
            print(f"[paper] sequential rule, stage {stage}: {len(steps)} inconclusive check(s) to their next look "
                  f"({looks}{', ...' if len(steps) > 3 else ''}); {len(more)} run(s)", flush=True)
            if st.pending:
                trained += len(st.pending)
                launches += _train(grid, st, recipe, common, runs_dir, engine, dataset, f"sequential stage {stage}")
    except KeyboardInterrupt:
        print("[paper] interrupted: the finished runs are kept; the same command resumes", file=sys.stderr)
        return 130
    except (BadInput, RecipeError, GridError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        runs = _load(grid, runs_dir)
        index = _index(runs[grid.runs()[0][0].run_name(grid.runs()[0][1])])
        timing = {"runs_dir": _shown(runs_dir), "trained": trained, "launches": launches,
                  "seconds": time.perf_counter() - started,
                  "run_seconds": sum(r["summary"]["wall_seconds"] for r in runs.values()),
                  "grid_runs": base_runs, "extra_runs": len(grid.extra), "extra_budget": extra_runs}
        command = "python -m tools.paper " + " ".join(shlex.quote(a) for a in argv)
        analyses = report.write(grid, cfg, runs, out, command.strip(), index, timing, engine)
    except (OSError, KeyError, ValueError) as e:  # a run record that cannot be read or analysed
        print(f"error: the report failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print()
    print(report.verdict_table(analyses))
    for line in report.too_few_seeds(grid)[:1]:  # as the report says at its top
        print("\n" + line.replace("**", ""))
    stale_now = report.stale_runs(runs, engine)
    if stale_now:
        print(f"\n{len(stale_now)} of {len(runs)} runs are stale (trained by another engine or without an engine "
              "stamp; listed in the report): --retrain-stale trains them again")
    print(f"\nwrote {os.path.join(out, 'paper.md')}, {os.path.join(out, 'paper.json')} and "
          f"{len([a for a in analyses if a.plot])} plots ({time.perf_counter() - started:.0f} s)")
    return 0


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _index(run: dict) -> dict | None:
    """The shard index the runs trained on (for the scale-down table), or None if it is gone."""
    import yaml

    try:
        with open(os.path.join(run["dir"], "config.yaml")) as f:
            shards = yaml.safe_load(f)["data"]["shards"]
        with open(os.path.join(ROOT, shards, "index.json")) as f:  # train.py runs in ROOT
            return json.load(f)
    except (OSError, KeyError, TypeError, ValueError):
        return None

