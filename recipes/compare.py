"""Compare runs: a table, and PNG plots like the RI-SGD paper's Figure 2.

    python -m recipes.compare runs/A runs/B ... [--out DIR]

Plots test accuracy and training loss against iterations, communication rounds and wall-clock
seconds (``DIR/vs_iterations.png``, ``vs_rounds.png``, ``vs_wall.png``). Runs that differ only in
their seed are also averaged into one row each (mean and spread over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

from . import naming

X_AXES = (("step", "iterations", "vs_iterations.png"), ("comm_rounds", "communication rounds", "vs_rounds.png"),
          ("wall_seconds", "wall-clock seconds", "vs_wall.png"))


def load_run(run_dir: str) -> dict:
    summary_path = os.path.join(run_dir, "summary.json")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(summary_path):
        raise FileNotFoundError(f"{summary_path} is missing: the run has not finished (re-run it to resume)")
    with open(summary_path) as f:
        summary = json.load(f)
    with open(metrics_path) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return {"dir": run_dir, "summary": summary, "metrics": metrics, "label": label(summary)}


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
    """Mean (and min..max) over seeds of runs with the same label; None if no label repeats."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["label"]].append(r["summary"])
    if all(len(g) == 1 for g in groups.values()):
        return None
    head = f"{'algorithm (mean over seeds)':<34} {'seeds':>5} {'rounds':>8} {'final acc':>10} {'min..max':>14}" \
           f" {'final loss':>11}"
    lines = [head, "-" * len(head)]
    for name, group in groups.items():
        accs = [s["final_test_acc"] for s in group]
        lines.append(f"{name:<34} {len(group):>5} {statistics.fmean(s['comm_rounds'] for s in group):>8.0f} "
                     f"{statistics.fmean(accs):>10.2f} {f'{min(accs):.2f}..{max(accs):.2f}':>14} "
                     f"{statistics.fmean(s['final_train_loss'] for s in group):>11.4f}")
    return "\n".join(lines)


def plot(runs: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    # One colour per algorithm setting; seeds of the same setting share it (line styles differ).
    labels = list(dict.fromkeys(r["label"] for r in runs))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(labels)}
    styles = ("-", "--", ":", "-.")
    paths = []
    for key, xlabel, filename in X_AXES:
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
        seen: dict[str, int] = {}
        for r in runs:
            nth = seen[r["label"]] = seen.get(r["label"], -1) + 1
            look = {"color": colours[r["label"]], "linestyle": styles[nth % len(styles)],
                    "label": r["label"] if nth == 0 else None}
            points = [m for m in r["metrics"] if m.get("test_acc") is not None]
            ax_acc.plot([m[key] for m in points], [m["test_acc"] for m in points], marker=".", **look)
            ax_loss.plot([m[key] for m in r["metrics"]], [m["train_loss"] for m in r["metrics"]], **look)
        ax_acc.set(xlabel=xlabel, ylabel="test accuracy (%)", title=f"test accuracy vs {xlabel}")
        ax_loss.set(xlabel=xlabel, ylabel="training loss", title=f"training loss vs {xlabel}", yscale="log")
        if key == "comm_rounds":  # SyncSGD has ~tau times more rounds: a log axis shows both
            ax_acc.set_xscale("log")
            ax_loss.set_xscale("log")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=8, title="line style: seed" if len(runs) > len(labels) else None,
                      title_fontsize=7)
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
        runs = [load_run(d) for d in args.runs]
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
        for path in plot(runs, out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
