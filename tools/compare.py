"""Compare runs: a table, and PNG plots like the RI-SGD paper's Figure 2.

    python -m tools.compare runs/A runs/B ... [--out DIR]
    python -m tools.compare runs [--out DIR]          # a folder of runs: its finished runs

Each argument is a run directory (``runs/NAME``) or a folder of them (``runs``): a folder stands for
its finished runs (subdirectories with a summary.json, by name), and a note on stderr says how many
it took and which unfinished ones (a config.yaml, no summary.json yet) it passed over.

Plots test accuracy and training loss against iterations, communication rounds, wall-clock seconds
and images drawn (``DIR/vs_iterations.png``, ``vs_rounds.png``, ``vs_wall.png``, ``vs_samples.png``;
DIR defaults to the first run's parent, i.e. the folder when a folder was given); every evaluation is
a marker, so a run evaluated once is a point. The legend, below each panel, names every run, one
colour per experiment. Images drawn is the equal-compute axis: step times the images a step draws over
all workers (from RUN/config.yaml and RUN/manifest.yaml), which under the ``per_chunk`` batch policy
grows with mu, so RI-SGD's steps cost more there than PR-SGD's, and in wall-clock seconds.

Each PNG records the runs it plots. A re-run of the same comparison replaces its PNGs; a vs_*.png in
DIR that plots other runs (or that compare did not write) is never replaced silently: that is an
error before any output (exit 2) unless ``--force`` is given; ``--out DIR`` writes elsewhere.

Runs whose curves on a panel are identical (the same x and y values) hide each other, the last drawn
on top: the later ones' labels end with ``(same curve as RUN)``, RUN being the first drawn (the loss
panel then gets a legend of its own), and a note on stderr per set of such runs names them and the
panels, e.g. ``note: runs A and B draw identical curves (one hides the other): training loss vs
iterations``.

Runs are seeds of one experiment when their saved configs
(``RUN/config.yaml``) differ in the seed only (and in operational keys: paths, logging, wandb); such
runs are also averaged into one row (mean and spread over seeds). Runs of different experiments are
never merged: the table's rows, the seed table and the legend name each experiment by its label and,
in brackets, the keys in which the experiments differ beyond the label (``RI-SGD tau=5 mu=0.5
[steps=12]`` against ``PR-SGD tau=5 [steps=102]``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

from risgd_common.cli import Parser
from risgd_common.install import MissingExtra, need
from risgd_trainer import naming
from risgd_trainer.run_config import experiment_keys

X_AXES = (("step", "iterations", "vs_iterations.png"), ("comm_rounds", "communication rounds", "vs_rounds.png"),
          ("wall_seconds", "wall-clock seconds", "vs_wall.png"), ("samples", "images drawn (all workers)",
                                                                   "vs_samples.png"))


# summary.json keys that describe the run's setting (a run without a config.yaml is grouped by these)
SETTING_KEYS = ("algorithm", "tau", "mu", "batch_policy", "world_size", "steps", "node_size", "tau_intra",
                "overlap", "compress", "outer_lr", "outer_momentum")


def _is_run(path: str) -> bool:
    """Whether ``path`` is a run directory, finished or not (the trainer writes config.yaml first)."""
    return any(os.path.exists(os.path.join(path, f)) for f in ("summary.json", "config.yaml", "metrics.jsonl"))


def expand(paths: list[str]) -> list[str]:
    """The run directories that ``paths`` name: a run directory (finished or not) or a missing path as
    it is, for :func:`load_run` to take or name; a folder of runs as its finished runs, sorted by name,
    with a note on stderr. Raises FileNotFoundError for a folder that holds no finished run."""
    out = []
    for d in paths:
        if not os.path.isdir(d) or _is_run(d):
            out.append(d)
            continue
        subdirs = sorted(e.name for e in os.scandir(d) if e.is_dir())
        finished = [s for s in subdirs if os.path.exists(os.path.join(d, s, "summary.json"))]
        unfinished = [s for s in subdirs if s not in finished and _is_run(os.path.join(d, s))]
        skipped = f"{len(unfinished)} unfinished: {', '.join(unfinished)}" if unfinished else ""
        if not finished:
            raise FileNotFoundError(f"{d} holds no finished run{f' ({skipped})' if skipped else ''}: give run "
                                    "directories (runs/NAME) or a folder of them")
        print(f"note: took {len(finished)} run{'s' if len(finished) > 1 else ''} from {d}"
              + (f" (skipped {skipped})" if skipped else ""), file=sys.stderr)
        out += [os.path.join(d, s) for s in finished]
    return out


def load_run(run_dir: str) -> dict:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} does not exist: give a run directory (runs/NAME)")
    summary_path = os.path.join(run_dir, "summary.json")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(summary_path):
        raise FileNotFoundError(f"{summary_path} is missing: the run has not finished (re-run it to resume)")
    with open(summary_path) as f:
        summary = json.load(f)
    with open(metrics_path) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return {"dir": run_dir, "summary": summary, "metrics": metrics, "label": label(summary),
            "experiment": experiment(run_dir, summary)}


def images_per_step(run_dir: str) -> int | None:
    """The images a step draws over all workers, as the run's batch policy plans it from its
    ``config.yaml`` (``data.base_batch``, ``data.batch_policy``, ``node_size``) and ``manifest.yaml``
    (the chunks each worker holds): under ``per_chunk`` it grows with mu (RI-SGD at mu=0.5 on 4 workers
    draws 96 per worker against PR-SGD's 32), under ``split`` it does not. None without both files.
    Workers that are down for a while are not subtracted."""
    import yaml

    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        with open(os.path.join(run_dir, "manifest.yaml")) as f:
            manifest = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        data, workers = cfg["data"], manifest["ranks"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    from risgd_data.loader import sub_batch_sizes

    base = data["base_batch"] * int(cfg.get("node_size") or 1)  # a node-level worker's ranks share its batch
    return sum(sum(sub_batch_sizes([c["fraction"] for c in w["chunks"]], [c["samples"] for c in w["chunks"]],
                                   base, data.get("batch_policy", "per_chunk"))) for w in workers)


def experiment(run_dir: str, summary: dict) -> dict:
    """What makes a run the experiment it is: its config.yaml's experiment keys but the seed
    (:func:`trainer.run_config.experiment_keys`); for a run without one, its summary's setting keys."""
    path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(path):
        import yaml

        with open(path) as f:
            cfg = yaml.safe_load(f)
        if isinstance(cfg, dict):
            return experiment_keys(cfg, ignore=("seed",))
    return {k: summary.get(k) for k in SETTING_KEYS}


# the keys a label names (:func:`label`): a difference in them is in the label already
LABEL_KEYS = ("algorithm", "tau", "mu", "batch_policy", "data.batch_policy")


def _value(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def group(runs: list[dict]) -> list[tuple[str, list[dict]]]:
    """The runs as experiments, in order of first appearance: (name, runs). The name is the label and,
    in brackets, the experiment's value of every key in which the experiments differ beyond what the
    labels name (``RI-SGD tau=5 mu=0.5 [steps=12]``, ``PR-SGD tau=5 [steps=102]``); experiments that
    share a label are also told apart by the keys the label would name (e.g. ``data.batch_policy`` of
    two PR-SGD runs)."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(_value(r["experiment"]), []).append(r)
    exps = [members[0]["experiment"] for members in groups.values()]
    everywhere = {k for e in exps for k in e if k not in LABEL_KEYS and len({_value(x.get(k)) for x in exps}) > 1}
    by_label: dict[str, list[dict]] = defaultdict(list)
    for members in groups.values():
        by_label[members[0]["label"]].append(members[0]["experiment"])
    out = []
    for members in groups.values():
        first = members[0]
        others = [e for e in by_label[first["label"]] if e is not first["experiment"]]
        differ = sorted(everywhere | {k for e in others for k in set(e) | set(first["experiment"])
                                      if e.get(k) != first["experiment"].get(k)})
        tags = ", ".join(f"{k}={first['experiment'].get(k)}" for k in differ)
        out.append((f"{first['label']} [{tags}]" if tags else first["label"], members))
    return out


def names(runs: list[dict]) -> list[str]:
    """Each run's experiment name (:func:`group`), in the order of ``runs``."""
    of = {id(r): name for name, members in group(runs) for r in members}
    return [of[id(r)] for r in runs]


def label(summary: dict) -> str:
    """A finished run's label (:func:`trainer.naming.label`) from its summary.json."""
    return naming.label(summary["algorithm"], summary.get("tau"), summary.get("mu", 0.0),
                        summary.get("batch_policy", "per_chunk"))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (("comm_rounds", "rounds", "d"), ("comm_bytes", "comm MB", ".2f"), ("comm_seconds", "comm s", ".2f"),
           ("wall_seconds", "wall s", ".1f"), ("final_test_acc", "final acc", ".2f"),
           ("best_test_acc", "best acc", ".2f"), ("final_train_loss", "final loss", ".4f"))


def table(runs: list[dict], named: bool = False) -> str:
    """One row per run. ``named``: its experiment's name (:func:`names`: the label and the keys in which
    the experiments differ) in the second column, else its label."""
    shown = names(runs) if named else [r["label"] for r in runs]
    width = max([24, *(len(n) for n in shown)])
    head = f"{'run':<34} {'algorithm':<{width}}" + "".join(f" {name:>10}" for _, name, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for r, name in zip(runs, shown):
        s = dict(r["summary"], comm_bytes=r["summary"]["comm_bytes"] / 1e6)
        lines.append(f"{os.path.basename(r['dir'].rstrip('/')):<34} {name:<{width}}"
                     + "".join(f" {_fmt(s.get(k), spec):>10}" for k, _, spec in COLUMNS))
    return "\n".join(lines)


def seed_table(runs: list[dict]) -> str | None:
    """Mean (and min..max) over the seeds of each experiment (:func:`group`); None if none has two."""
    groups = [(name, [r["summary"] for r in members]) for name, members in group(runs)]
    if all(len(g) == 1 for _, g in groups):
        return None
    width = max(34, *(len(name) for name, _ in groups))
    head = f"{'experiment (mean over seeds)':<{width}} {'seeds':>5} {'rounds':>8} {'final acc':>10} " \
           f"{'min..max':>14} {'final loss':>11}"
    lines = [head, "-" * len(head)]
    for name, members in groups:
        accs = [s["final_test_acc"] for s in members]
        lines.append(f"{name:<{width}} {len(members):>5} {statistics.fmean(s['comm_rounds'] for s in members):>8.0f} "
                     f"{statistics.fmean(accs):>10.2f} {f'{min(accs):.2f}..{max(accs):.2f}':>14} "
                     f"{statistics.fmean(s['final_train_loss'] for s in members):>11.4f}")
    return "\n".join(lines)


PANELS = (("test_acc", "test accuracy"), ("train_loss", "training loss"))


def curve(run: dict, key: str, value: str) -> tuple[list, list]:
    """A run's points on one panel: x (``key``) and y (``value``) of the metrics lines that have both.
    ``key`` "samples" is the step times the run's ``images_per_step`` (:func:`plot` sets it; none without)."""
    if key == "samples":
        per_step = run.get("images_per_step")
        points = [m for m in run["metrics"] if m.get(value) is not None and per_step and m.get("step") is not None]
        return [m["step"] * per_step for m in points], [m[value] for m in points]
    points = [m for m in run["metrics"] if m.get(value) is not None and m.get(key) is not None]
    return [m[key] for m in points], [m[value] for m in points]


def same_curves(curves: list[tuple[list, list]]) -> list[list[int]]:
    """The indices of curves identical to another (the same x and y values), in sets of two or more in
    order; empty curves draw nothing and hide nothing."""
    sets: dict[tuple, list[int]] = {}
    for i, (x, y) in enumerate(curves):
        if x:
            sets.setdefault((tuple(x), tuple(y)), []).append(i)
    return [members for members in sets.values() if len(members) > 1]


def _names(names: list[str]) -> str:
    return f"{', '.join(names[:-1])} and {names[-1]}"


def figure(runs: list[dict], key: str, xlabel: str):
    """One of :func:`plot`'s figures: test accuracy and training loss against ``key``. Returns the
    figure and its identical curves as (panel, run names in drawing order): the last drawn of a set
    hides the others, and every one after the first is labelled ``(same curve as FIRST)``."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import offset_copy

    # One colour per experiment (group); its seeds share it, with line styles of their own. Every line
    # is named in the legend by its run directory.
    groups = group(runs)
    drawn, looks, labels = [], [], []
    for i, (name, members) in enumerate(groups):
        for nth, r in enumerate(members):
            run = os.path.basename(r["dir"].rstrip("/"))
            drawn.append(run)
            looks.append({"color": plt.get_cmap("tab10")(i % 10), "linestyle": ("-", "--", ":", "-.")[nth % 4]})
            labels.append(f"{run} ({name})")
    ordered = [r for _, members in groups for r in members]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    same, legends = [], []
    for ax, (value, title) in zip(axes, PANELS):
        curves = [curve(r, key, value) for r in ordered]
        suffix = {}
        for members in same_curves(curves):
            same.append((title, [drawn[i] for i in members]))
            suffix.update({i: f" (same curve as {drawn[members[0]]})" for i in members[1:]})
        for i, (x, y) in enumerate(curves):  # a marker at every evaluation: one evaluation is a point
            ax.plot(x, y, marker=".", label=labels[i] + suffix.get(i, ""), **looks[i])
        ax.set(xlabel=xlabel, ylabel="test accuracy (%)" if value == "test_acc" else title,
               title=f"{title} vs {xlabel}")
        if value == "train_loss":
            ax.set_yscale("log")
        if key == "comm_rounds":  # SyncSGD has ~tau times more rounds: a log axis shows both
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if key == "samples":  # hundreds of thousands: 1e5 once at the axis' end, not on every tick
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        # the legends go below their panels, under the x label, outside the axes (inside, one covers
        # points wherever it goes); savefig's tight box takes them in
        below = {"loc": "upper left", "bbox_to_anchor": (0.0, 0.0), "borderaxespad": 0.0, "fontsize": 7,
                 "bbox_transform": offset_copy(ax.transAxes, fig, y=-40, units="points")}
        if value == "test_acc":
            legends.append(ax.legend(title="colour: experiment, line style: its seeds" if len(runs) > len(groups)
                                     else None, title_fontsize=7, **below))
        elif suffix:  # the accuracy legend does not say which loss curves coincide
            legends.append(ax.legend(**below))
    for legend in legends:  # the panels keep their size (tight_layout without the legends) ...
        legend.set_in_layout(False)
    fig.tight_layout()
    for legend in legends:  # ... and the saved image grows to hold them (savefig's tight box)
        legend.set_in_layout(True)
    return fig, same


# the PNG text key under which a plot records the runs it compares (their real paths, one a line)
RUNS_KEY = "risgd-compare runs"


def _compared(runs: list[dict]) -> str:
    return "\n".join(sorted(os.path.realpath(r["dir"]) for r in runs))


def plotted_runs(path: str) -> str | None:
    """The runs a PNG of ours compares (as :data:`RUNS_KEY` holds them), or None: another file, or a
    plot from before the key was written."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.text.get(RUNS_KEY)
    except (ImportError, OSError, AttributeError, ValueError):
        return None


def taken(runs: list[dict], out_dir: str) -> list[str]:
    """The PNGs :func:`plot` would write in ``out_dir`` that exist and are not plots of these same runs
    (another comparison's, or files of another origin): replacing them takes ``--force``."""
    paths = [os.path.join(out_dir, filename) for _, _, filename in X_AXES]
    return [p for p in paths if os.path.exists(p) and plotted_runs(p) != _compared(runs)]


def plot(runs: list[dict], out_dir: str) -> list[str]:
    """Writes the PNGs (:data:`X_AXES`) to ``out_dir`` and returns their paths, each recording the runs
    it compares (:data:`RUNS_KEY`); notes on stderr name runs whose curves are identical (one hides the
    other), one line per set of runs, and runs left out of the images-drawn plot (no manifest.yaml).
    The plot against images drawn is written when at least one run has that count (each run's
    ``images_per_step`` is set here, :func:`images_per_step`)."""
    matplotlib = need("matplotlib", "plotting (--no-plots skips it)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    hidden: dict[tuple[str, ...], dict[str, list[str]]] = {}  # run names -> panel -> x axes
    for r in runs:  # (read here, not in load_run: a manifest for every run of the paper's report is slow)
        if "images_per_step" not in r:
            r["images_per_step"] = images_per_step(r["dir"])
    uncounted = [os.path.basename(r["dir"].rstrip("/")) for r in runs if not r["images_per_step"]]
    for key, xlabel, filename in X_AXES:
        if key == "samples" and len(uncounted) == len(runs):
            continue
        fig, same = figure(runs, key, xlabel)
        for title, names in same:
            hidden.setdefault(tuple(names), {}).setdefault(title, []).append(xlabel)
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=110, bbox_inches="tight", metadata={RUNS_KEY: _compared(runs)})
        plt.close(fig)
        paths.append(path)
    if uncounted and len(uncounted) < len(runs):
        print(f"note: {', '.join(uncounted)} not in vs_samples.png (no manifest.yaml and config.yaml to count the "
              "images a step draws)", file=sys.stderr)
    for names, panels in hidden.items():
        hides = "one hides the other" if len(names) == 2 else "the last drawn hides the others"
        where = "; ".join(f"{title} vs {', '.join(xlabels)}" for title, xlabels in panels.items())
        print(f"note: runs {_names(list(names))} draw identical curves ({hides}): {where}", file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (runs/NAME), or folders of them (runs)")
    parser.add_argument("--out", help="where the PNGs go (default: the first run's parent directory: the folder, "
                                      "for a folder of runs)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    parser.add_argument("--force", action="store_true",
                        help="replace vs_*.png in the --out folder that plot other runs (without it, that is an "
                             "error; the plots of the same runs are always replaced)")
    args = parser.parse_args(argv)
    try:
        run_dirs = expand(args.runs)
        seen: dict[str, str] = {}
        for d in run_dirs:  # a run named twice (overlapping globs, a folder and one of its runs) is one run
            seen.setdefault(os.path.realpath(d), d)
        if len(seen) < len(run_dirs):
            print(f"note: {len(run_dirs) - len(seen)} run director(ies) given twice, counted once", file=sys.stderr)
        runs = [load_run(d) for d in seen.values()]
    except FileNotFoundError as e:  # bad input: a directory that holds no finished run
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.dirname(os.path.abspath(runs[0]["dir"].rstrip("/")))
    clash = [] if args.no_plots or args.force else taken(runs, out)
    if clash:  # before any output: the earlier comparison's plots are not lost by a re-run elsewhere
        more = f"; {len(clash) - 1} more vs_*.png there too" if len(clash) > 1 else ""
        print(f"error: {clash[0]} plots other runs (an earlier comparison{more}): give --out DIR for these plots, "
              "or --force to replace them", file=sys.stderr)
        return 2
    print(table(runs, named=True))
    per_seed = seed_table(runs)
    if per_seed:
        print()
        print(per_seed)
    if not args.no_plots:
        try:
            paths = plot(runs, out)
        except MissingExtra as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for path in paths:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
