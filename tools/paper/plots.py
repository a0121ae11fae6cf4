"""The paper report's plots: PNGs next to paper.md, seeds as min..max bands around the mean."""

from __future__ import annotations

import os
import statistics

from .. import compare
from .analysis import Context
from .grid import Setting


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _band(ax, xs, ys_by_seed: list[list[float]], label: str, colour, marker: str = "", style: str = "-"):
    """Mean line and min..max band over seeds (``ys_by_seed``: one list per seed, same length)."""
    cols = list(zip(*ys_by_seed))
    mean = [statistics.fmean(c) for c in cols]
    ax.plot(xs, mean, color=colour, label=label, marker=marker, linestyle=style, linewidth=1.4, markersize=4)
    if len(ys_by_seed) > 1:
        ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=colour, alpha=0.2, linewidth=0)


def curves(ctx: Context, name: str, title: str, series: list[tuple[str, Setting, tuple]],
           axes=compare.X_AXES) -> str:
    """Test accuracy (top) and training loss (bottom) against each x of ``axes``, one line per
    setting; the metrics lines of a setting's seeds are aligned by evaluation. An x of ``axes`` is a
    metrics key or a function (run, metrics line) -> x (e.g. the cost model's time)."""
    if not ctx.draw:  # an analysis for its verdicts only (the sequential rule's stages)
        return name
    plt = _plt()
    fig, grid = plt.subplots(2, len(axes), figsize=(4.2 * len(axes), 6.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for i, (label, setting, seeds) in enumerate(series):
        runs = list(ctx.of(setting, seeds).values())
        n = min(len(r["metrics"]) for r in runs)
        for col, (key, xlabel, _) in enumerate(axes):
            xs = [statistics.fmean(key(r, r["metrics"][k]) if callable(key) else r["metrics"][k][key]
                                   for r in runs) for k in range(n)]
            for row, (metric, ylabel) in enumerate((("test_acc", "test accuracy (%)"),
                                                   ("train_loss", "training loss"))):
                ys = [[r["metrics"][k][metric] for k in range(n)] for r in runs]
                ax = grid[row][col]
                _band(ax, xs, ys, label, colours(i % 10))
                ax.set(xlabel=xlabel, ylabel=ylabel)
                if metric == "train_loss":
                    ax.set_yscale("log")
                if key == "comm_rounds":
                    ax.set_xscale("log")
                ax.grid(alpha=0.3)
    grid[0][0].legend(fontsize=7, title="band: min..max over seeds", title_fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, ctx, name)


def _save(fig, ctx: Context, name: str) -> str:
    import io

    from risgd_common.atomic import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    write_bytes_atomic(os.path.join(ctx.out_dir, name), buf.getvalue())
    return name


def xy_plot(ctx: Context, name: str, title: str, panels: list[dict]) -> str:
    """Panels of lines over a numeric x: each panel {'xlabel', 'ylabel', 'xlog', 'ylog', 'lines':
    [(label, xs, ys_by_seed)]}."""
    if not ctx.draw:
        return name
    plt = _plt()
    fig, axs = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, panel in zip(axs[0], panels):
        for i, (label, xs, ys) in enumerate(panel["lines"]):
            _band(ax, xs, ys, label, colours(i % 10), marker="o")
        ax.set(xlabel=panel["xlabel"], ylabel=panel["ylabel"], title=panel.get("title", ""))
        if panel.get("xlog"):
            ax.set_xscale("log")
        ticks = sorted({x for _, xs, _ in panel["lines"] for x in xs})
        if len(ticks) <= 10:  # the grid's own values (taus, s, mu) as the ticks
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.minorticks_off()
        if panel.get("ylog"):
            ax.set_yscale("log")
        for x, text in panel.get("marks", []):
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
            ax.annotate(text, (x, 0.02), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                        ha="right", va="bottom", color="grey")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, ctx, name)
