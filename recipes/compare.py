"""Compare runs: a table, and PNG plots like the RI-SGD paper's Figure 2.

    python -m recipes.compare runs/A runs/B ... [--out DIR]

Plots test accuracy and training loss against iterations, communication rounds and wall-clock
seconds (``DIR/vs_iterations.png``, ``vs_rounds.png``, ``vs_wall.png``); the legend names every
run, one colour per experiment. Runs are seeds of one experiment when their saved configs
(``RUN/config.yaml``) differ in the seed only (and in operational keys: paths, logging, wandb); such
runs are also averaged into one row (mean and spread over seeds). Runs of different experiments are
never merged: where two share a label (e.g. 12 and 102 steps), their rows name the keys that differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

from risgd_common.install import MissingExtra, need

from . import naming
from .config import experiment_keys

X_AXES = (("step", "iterations", "vs_iterations.png"), ("comm_rounds", "communication rounds", "vs_rounds.png"),
          ("wall_seconds", "wall-clock seconds", "vs_wall.png"))


# summary.json keys that describe the run's setting (a run without a config.yaml is grouped by these)
SETTING_KEYS = ("algorithm", "tau", "mu", "batch_policy", "world_size", "steps", "node_size", "tau_intra",
                "overlap", "compress", "outer_lr", "outer_momentum")


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


def experiment(run_dir: str, summary: dict) -> dict:
    """What makes a run the experiment it is: its config.yaml's experiment keys but the seed
    (:func:`recipes.config.experiment_keys`); for a run without one, its summary's setting keys."""
    path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(path):
        import yaml

        with open(path) as f:
            cfg = yaml.safe_load(f)
        if isinstance(cfg, dict):
            return experiment_keys(cfg, ignore=("seed",))
    return {k: summary.get(k) for k in SETTING_KEYS}


def group(runs: list[dict]) -> list[tuple[str, list[dict]]]:
    """The runs as experiments, in order of first appearance: (name, runs). The name is the label;
    where two experiments share a label it adds the keys in which they differ (``[steps=12]``)."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(json.dumps(r["experiment"], sort_keys=True, default=str), []).append(r)
    by_label: dict[str, list[dict]] = defaultdict(list)
    for members in groups.values():
        by_label[members[0]["label"]].append(members[0]["experiment"])
    out = []
    for members in groups.values():
        first = members[0]
        others = [e for e in by_label[first["label"]] if e is not first["experiment"]]
        differ = sorted({k for e in others for k in set(e) | set(first["experiment"])
                         if e.get(k) != first["experiment"].get(k)})
        tags = ", ".join(f"{k}={first['experiment'].get(k)}" for k in differ)
        out.append((f"{first['label']} [{tags}]" if tags else first["label"], members))
    return out


def label(summary: dict) -> str:
    """A finished run's label (:func:`recipes.naming.label`) from its summary.json."""
    return naming.label(summary["algorithm"], summary.get("tau"), summary.get("mu", 0.0),
                        summary.get("batch_policy", "per_chunk"))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (("comm_rounds", "rounds", "d"), ("comm_bytes", "comm MB", ".2f"), ("comm_seconds", "comm s", ".2f"),
           ("wall_seconds", "wall s", ".1f"), ("final_test_acc", "final acc", ".2f"),
           ("best_test_acc", "best acc", ".2f"), ("final_train_loss", "final loss", ".4f"))


def table(runs: list[dict]) -> str:
    head = f"{'run':<34} {'algorithm':<24}" + "".join(f" {name:>10}" for _, name, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in runs:
        s = dict(r["summary"], comm_bytes=r["summary"]["comm_bytes"] / 1e6)
        lines.append(f"{os.path.basename(r['dir'].rstrip('/')):<34} {r['label']:<24}"
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


def plot(runs: list[dict], out_dir: str) -> list[str]:
    matplotlib = need("matplotlib", "plotting (--no-plots skips it)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    # One colour per experiment (group); its seeds share it, with line styles of their own. Every line
    # is named in the legend by its run directory.
    groups = group(runs)
    colour, style = {}, {}
    for i, (_, members) in enumerate(groups):
        for nth, r in enumerate(members):
            colour[id(r)], style[id(r)] = plt.get_cmap("tab10")(i % 10), ("-", "--", ":", "-.")[nth % 4]
    paths = []
    for key, xlabel, filename in X_AXES:
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
        for name, members in groups:
            for r in members:
                run = os.path.basename(r["dir"].rstrip("/"))
                look = {"color": colour[id(r)], "linestyle": style[id(r)]}
                points = [m for m in r["metrics"] if m.get("test_acc") is not None]
                ax_acc.plot([m[key] for m in points], [m["test_acc"] for m in points], marker=".",
                            label=f"{run} ({name})", **look)
                ax_loss.plot([m[key] for m in r["metrics"]], [m["train_loss"] for m in r["metrics"]], **look)
        ax_acc.set(xlabel=xlabel, ylabel="test accuracy (%)", title=f"test accuracy vs {xlabel}")
        ax_loss.set(xlabel=xlabel, ylabel="training loss", title=f"training loss vs {xlabel}", yscale="log")
        if key == "comm_rounds":  # SyncSGD has ~tau times more rounds: a log axis shows both
            ax_acc.set_xscale("log")
            ax_loss.set_xscale("log")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=7, title="colour: experiment, line style: its seeds" if len(runs) > len(groups)
                      else None, title_fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    parser.add_argument("--out", help="where the PNGs go (default: the runs' parent directory)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    try:
        seen: dict[str, str] = {}
        for d in args.runs:  # a run named twice (overlapping globs) is one run, not two seeds
            seen.setdefault(os.path.realpath(d), d)
        if len(seen) < len(args.runs):
            print(f"note: {len(args.runs) - len(seen)} run director(ies) given twice, counted once", file=sys.stderr)
        runs = [load_run(d) for d in seen.values()]
    except FileNotFoundError as e:  # bad input: a directory that holds no finished run
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(runs))
    per_seed = seed_table(runs)
    if per_seed:
        print()
        print(per_seed)
    if not args.no_plots:
        out = args.out or os.path.dirname(os.path.abspath(args.runs[0].rstrip("/")))
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
