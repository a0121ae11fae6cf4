"""The paper report from finished runs: per experiment the numbers, the checks and their verdict, a
plot (seeds as min..max bands around the mean), then ``paper.md`` and ``paper.json``.

Runs are read with :func:`recipes.compare.load_run`; the per-run table at the end of the report is
:func:`recipes.compare.table`. The verdict rules are :mod:`recipes.paper_verdict`'s.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from risgd_common.atomic import write_text_atomic

from . import compare
from . import paper_verdict as V
from .paper_grid import Experiment, Grid, Setting


@dataclass
class Analysis:
    """One experiment's result: what goes into paper.json and paper.md."""

    exp: Experiment
    checks: list[V.Check]
    numbers: dict
    table: str                     # markdown
    plot: str | None               # PNG file name, next to paper.md
    notes: list[str] = field(default_factory=list)
    headline: str = ""             # the key numbers, one line (seed means)

    @property
    def verdict(self) -> str:
        return V.combine([c.verdict for c in self.checks])


class Context:
    """The grid and its finished runs (``compare.load_run`` dicts) by run name."""

    def __init__(self, grid: Grid, runs: dict[str, dict], out_dir: str):
        self.grid, self.runs, self.out_dir = grid, runs, out_dir

    def of(self, setting: Setting, seeds) -> dict[int, dict]:
        return {seed: self.runs[setting.run_name(seed)] for seed in seeds}

    def values(self, setting: Setting, seeds, fn: Callable[[dict], float]) -> dict[int, float]:
        return {seed: fn(run) for seed, run in self.of(setting, seeds).items()}


# -- numbers ----------------------------------------------------------------------------------------

def final_acc(run: dict) -> float:
    return run["summary"]["final_test_acc"]


def spread(values: dict[int, float | None]) -> dict:
    """mean, min, max and the per-seed values (None where a value is missing)."""
    got = [v for v in values.values() if v is not None]
    return {"mean": statistics.fmean(got) if got else None, "min": min(got, default=None),
            "max": max(got, default=None), "per_seed": {str(k): v for k, v in values.items()}}


def fmt(stat: dict, spec: str = ".2f") -> str:
    if stat["mean"] is None:
        return "-"
    if len(stat["per_seed"]) == 1 or stat["min"] == stat["max"]:
        return format(stat["mean"], spec)
    return f"{format(stat['mean'], spec)} ({format(stat['min'], spec)}..{format(stat['max'], spec)})"


def setting_numbers(ctx: Context, setting: Setting, seeds) -> dict:
    """The summary numbers of one setting over its seeds."""
    runs = ctx.of(setting, seeds)
    s = {seed: r["summary"] for seed, r in runs.items()}
    return {"label": setting.label(), "run_names": [setting.run_name(seed) for seed in seeds],
            "per_rank_batch": setting.per_rank_batch(ctx.grid.ranks),
            **{key: spread({seed: v.get(key) for seed, v in s.items()})
               for key in ("final_test_acc", "best_test_acc", "final_train_loss", "comm_rounds", "comm_seconds",
                           "wall_seconds", "divergence_mean", "min_data_coverage")}}


def batch_text(setting: Setting, ranks: int) -> str:
    """``128 per rank`` (and how RI-SGD draws it: ``32 per chunk`` or ``split``)."""
    text = f"{setting.per_rank_batch(ranks):g} per rank"
    if setting.algorithm == "risgd":
        text += f" ({setting.base_batch} per chunk)" if setting.batch_policy == "per_chunk" else " (split)"
    return text


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def points(run: dict, key: str = "comm_rounds") -> list[tuple[float, float]]:
    return [(m[key], m["test_acc"]) for m in run["metrics"] if m.get("test_acc") is not None]


# -- plots ------------------------------------------------------------------------------------------

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
    setting; the metrics lines of a setting's seeds are aligned by evaluation."""
    plt = _plt()
    fig, grid = plt.subplots(2, len(axes), figsize=(4.2 * len(axes), 6.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for i, (label, setting, seeds) in enumerate(series):
        runs = list(ctx.of(setting, seeds).values())
        n = min(len(r["metrics"]) for r in runs)
        for col, (key, xlabel, _) in enumerate(axes):
            xs = [statistics.fmean(r["metrics"][k][key] for r in runs) for k in range(n)]
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


def by_seed(ctx: Context, settings: list[Setting], seeds, fn) -> list[list[float]]:
    """[[fn(run of settings[0], seed), fn(run of settings[1], seed), ...] for each seed]."""
    return [[fn(ctx.runs[s.run_name(seed)]) for s in settings] for seed in seeds]


# -- the experiments --------------------------------------------------------------------------------

def analyse_fig2(ctx: Context, exp: Experiment) -> Analysis:
    g = ctx.grid
    mu_max = max(g.mus)
    checks, numbers, rows, plots = [], {"target_gap": V.TARGET_GAP, "partitions": {}}, [], []
    for part in g.partitions:
        settings = g.fig2(part)
        sync_final = ctx.values(settings["sync"], exp.seeds, final_acc)
        target = statistics.fmean(sync_final.values()) - V.TARGET_GAP
        rounds, reached, part_numbers = {}, {}, {"target_acc": target, "settings": {}}
        for key, s in settings.items():
            rounds[key] = ctx.values(s, exp.seeds, lambda r, t=target: V.rounds_to(points(r), t,
                                                                                  r["summary"]["comm_rounds"]))
            reached[key] = ctx.values(s, exp.seeds, lambda r, t=target: any(a >= t for _, a in points(r)))
            nums = setting_numbers(ctx, s, exp.seeds)
            nums["rounds_to_target"] = spread({k: v if reached[key][k] else None for k, v in rounds[key].items()})
            nums["seeds_reaching_target"] = sum(reached[key].values())
            part_numbers["settings"][str(key)] = nums
            never = len(exp.seeds) - nums["seeds_reaching_target"]
            reach = "never" if never == len(exp.seeds) else fmt(nums["rounds_to_target"], ".0f") + (
                f" (never on {never} of {len(exp.seeds)} seeds)" if never else "")
            rows.append([part, s.label(), fmt(nums["final_test_acc"]), fmt(nums["final_train_loss"], ".4f"), reach,
                         fmt(nums["comm_rounds"], ".0f"), fmt(nums["wall_seconds"], ".1f"),
                         fmt(nums["comm_seconds"], ".2f")])
        ordered = [statistics.fmean(rounds[mu].values()) for mu in sorted(g.mus)]
        part_numbers["rounds_non_increasing_in_mu"] = all(b <= a for a, b in zip(ordered, ordered[1:]))
        numbers["partitions"][part] = part_numbers
        where = f"{part}: RI-SGD mu={mu_max:g}"

        def reach(key, rounds=rounds, reached=reached):
            return {seed: (rounds[key][seed], reached[key][seed]) for seed in exp.seeds}

        checks += [
            V.fewer_rounds(f"{where} reaches SyncSGD's final accuracy - {V.TARGET_GAP:g} pt ({target:.2f}%) in fewer "
                           "rounds than SyncSGD", reach(mu_max), reach("sync"), detail="rounds saved per seed"),
            V.fewer_rounds(f"{where} reaches it in fewer rounds than PR-SGD (mu=0)", reach(mu_max), reach(0.0),
                           detail="rounds saved per seed"),
            V.paired(f"{where} ends within {V.TARGET_GAP:g} pt of SyncSGD's final accuracy",
                     ctx.values(settings[mu_max], exp.seeds, final_acc),
                     {k: v - V.TARGET_GAP for k, v in sync_final.items()}, 0.0,
                     detail="points above SyncSGD - 1 per seed"),
        ]
        series = [(s.label(), s, exp.seeds) for s in settings.values()]
        plots.append(curves(ctx, f"fig2_{part}.png", f"Fig. 2 here: {part} partition, tau={g.tau} "
                            f"({len(exp.seeds)} seed(s))", series))
    table = md_table(["partition", "setting", "final test acc", "final train loss",
                      f"rounds to SyncSGD - {V.TARGET_GAP:g} pt", "rounds", "wall s", "comm s"], rows)
    heads = []
    for part, pn in numbers["partitions"].items():
        reach = {k: pn["settings"][str(k)]["rounds_to_target"]["mean"] for k in ("sync", 0.0, mu_max)}
        text = ", ".join(f"{name} {'never' if reach[k] is None else f'{reach[k]:.0f}'}"
                         for k, name in (("sync", "SyncSGD"), (0.0, "PR-SGD"), (mu_max, f"mu={mu_max:g}")))
        heads.append(f"{part}: rounds to {pn['target_acc']:.1f}%: {text}")
    notes = [f"Also plotted: `{p}`." for p in plots[1:]]
    for part, pn in numbers["partitions"].items():
        notes.append(f"{part}: rounds to the target {'do' if pn['rounds_non_increasing_in_mu'] else 'do not'} "
                     "fall monotonically with mu (seed means; reported, not part of the verdict).")
    notes.append("The training loss is the mean of the ranks' own mini-batch losses since the last evaluation "
                 "(each rank on its own data), so on a label-sorted split PR-SGD's is the loss of a local model on "
                 "its 2-3 classes; no verdict uses it.")
    return Analysis(exp, checks, numbers, table, plots[0], notes, "; ".join(heads))


def analyse_tau(ctx: Context, exp: Experiment) -> Analysis:
    g = ctx.grid
    taus = g.sweep_taus()
    swept = [t for t in g.taus if t != g.steps]
    algs = ((0.0, "PR-SGD"), (g.tau_mu, f"RI-SGD mu={g.tau_mu:g}"))
    sweep = g.tau_sweep()
    acc = {k: ctx.values(s, exp.seeds, final_acc) for k, s in sweep.items()}
    numbers, rows, checks = {"taus": list(taus), "no_averaging_tau": g.steps, "settings": {}}, [], []
    for t in taus:
        row = [f"{t}" + (" (no averaging until the end)" if t == g.steps else ""),
               f"{g.steps // t}"]
        for mu, _ in algs:
            nums = setting_numbers(ctx, sweep[(mu, t)], exp.seeds)
            numbers["settings"][f"mu={mu:g},tau={t}"] = nums
            row += [fmt(nums["final_test_acc"]), fmt(nums["wall_seconds"], ".1f")]
        rows.append(row)
    knees = {}
    for mu, name in algs:
        means = {t: statistics.fmean(acc[(mu, t)].values()) for t in swept}
        knees[name] = V.knee(means)
        lo, hi = min(swept), max(swept)
        checks.append(V.paired(f"{name}: accuracy falls as tau grows (tau={lo} above tau={hi})",
                               acc[(mu, lo)], acc[(mu, hi)], V.ACC_MARGIN, detail="points per seed"))
    numbers["knee"] = knees
    numbers["knee_gap"] = V.KNEE_GAP
    pr_knee, ri_knee = knees["PR-SGD"], knees[algs[1][1]]
    checks += [
        V.boolean(f"PR-SGD's knee (largest tau within {V.KNEE_GAP:g} pt of its best) is around tau={g.tau} "
                  f"(between {g.tau / 2:g} and {2 * g.tau})", g.tau / 2 <= pr_knee <= 2 * g.tau,
                  detail=f"knee at tau={pr_knee}"),
        V.boolean(f"redundancy moves the knee no lower ({algs[1][1]}'s knee >= PR-SGD's)", ri_knee >= pr_knee,
                  detail=f"{ri_knee} vs {pr_knee}"),
        V.paired(f"no averaging until the end (tau={g.steps}): {algs[1][1]} above PR-SGD",
                 acc[(g.tau_mu, g.steps)], acc[(0.0, g.steps)], V.ACC_MARGIN, detail="points per seed"),
    ]
    table = md_table(["tau", "rounds", "PR-SGD final acc", "PR-SGD wall s", f"{algs[1][1]} final acc",
                      f"{algs[1][1]} wall s"], rows)
    panels = []
    for metric, ylabel, ylog in (("final_test_acc", "final test accuracy (%)", False),
                                 ("final_train_loss", "final training loss", True)):
        lines = [(name, list(taus), by_seed(ctx, [sweep[(mu, t)] for t in taus], exp.seeds,
                                            lambda r, m=metric: r["summary"][m])) for mu, name in algs]
        panels.append({"xlabel": "tau (local steps per round)", "ylabel": ylabel, "xlog": True, "ylog": ylog,
                       "lines": lines, "marks": [(g.steps, "no averaging")]})
    plot = xy_plot(ctx, "appA_tau.png", f"Appendix A here: the tau sweep ({g.partition})", panels)
    notes = [f"Knees: PR-SGD at tau={pr_knee}, {algs[1][1]} at tau={ri_knee}."]
    no_avg = [statistics.fmean(acc[(mu, g.steps)].values()) for mu, _ in algs]
    head = (f"knee: PR-SGD tau={pr_knee}, {algs[1][1]} tau={ri_knee}; no averaging (tau={g.steps}): "
            f"{algs[1][1]} {no_avg[1]:.2f} vs PR-SGD {no_avg[0]:.2f}")
    return Analysis(exp, checks, numbers, table, plot, notes, head)


def _settings_table(ctx: Context, exp: Experiment, named: list[tuple[str, Setting]], numbers: dict) -> str:
    rows = []
    for name, s in named:
        nums = setting_numbers(ctx, s, exp.seeds)
        numbers["settings"][name] = nums
        rows.append([s.label(), batch_text(s, ctx.grid.ranks), fmt(nums["final_test_acc"]), fmt(nums["best_test_acc"]),
                     fmt(nums["final_train_loss"], ".4f"), fmt(nums["divergence_mean"], ".2e"),
                     fmt(nums["wall_seconds"], ".1f")])
    return md_table(["setting", "batch", "final test acc", "best test acc", "final train loss",
                     "mean divergence", "wall s"], rows)


def analyse_diversity(ctx: Context, exp: Experiment) -> Analysis:
    g, d = ctx.grid, ctx.grid.diversity()
    numbers = {"settings": {}}
    table = _settings_table(ctx, exp, [("full_redundancy", d["full"]), ("coop", d["coop"])], numbers)
    checks = [V.paired(f"RI-SGD with full redundancy (mu={g.full_mu:g}) above cooperative SGD, final test accuracy "
                       f"(per-rank batch {d['coop'].base_batch} both)", ctx.values(d["full"], exp.seeds, final_acc),
                       ctx.values(d["coop"], exp.seeds, final_acc), V.ACC_MARGIN, detail="points per seed")]
    plot = curves(ctx, "fig3_diversity.png", f"Fig. 3 here: full redundancy vs cooperative SGD, tau={g.tau}",
                  [(f"RI-SGD full redundancy (mu={g.full_mu:g})", d["full"], exp.seeds),
                   ("Coop-SGD (every rank samples the whole set)", d["coop"], exp.seeds)], compare.X_AXES[::2])
    acc = numbers["settings"]
    head = (f"final acc: full redundancy {acc['full_redundancy']['final_test_acc']['mean']:.2f}, "
            f"Coop-SGD {acc['coop']['final_test_acc']['mean']:.2f}")
    return Analysis(exp, checks, numbers, table, plot, headline=head)


def analyse_saturation(ctx: Context, exp: Experiment) -> Analysis:
    g, s = ctx.grid, ctx.grid.saturation()
    numbers = {"settings": {}}
    table = _settings_table(ctx, exp, list(s.items()), numbers)
    big = s["prsgd_big"].base_batch
    checks = [V.paired(f"RI-SGD mu={g.tau_mu:g} above PR-SGD at the same per-rank batch {big}, final test accuracy",
                       ctx.values(s["risgd_big"], exp.seeds, final_acc),
                       ctx.values(s["prsgd_big"], exp.seeds, final_acc), V.ACC_MARGIN, detail="points per seed")]
    premise = {k: a - b for (k, a), b in zip(ctx.values(s["prsgd_big"], exp.seeds, final_acc).items(),
                                               ctx.values(s["prsgd"], exp.seeds, final_acc).values())}
    numbers["prsgd_big_minus_small_batch"] = spread(premise)
    notes = [f"Premise (not part of the verdict): PR-SGD at batch {big} minus PR-SGD at batch {g.base_batch}: "
             f"{fmt(spread(premise), '+.2f')} points. Saturation means the larger batch does not help."]
    plot = curves(ctx, "fig4_saturation.png", f"Fig. 4 here: {g.batch_factor}x batch, tau={g.tau}",
                  [(f"{v.label()}, {batch_text(v, g.ranks)}", v, exp.seeds) for v in s.values()],
                  compare.X_AXES[::2])
    acc = {k: v["final_test_acc"]["mean"] for k, v in numbers["settings"].items()}
    head = (f"final acc at batch {big}: RI-SGD {acc['risgd_big']:.2f}, PR-SGD {acc['prsgd_big']:.2f} "
            f"(at batch {g.base_batch}: {acc['risgd']:.2f}, {acc['prsgd']:.2f})")
    return Analysis(exp, checks, numbers, table, plot, notes, head)


def analyse_failures(ctx: Context, exp: Experiment) -> Analysis:
    g = ctx.grid
    f = g.failures()
    algs = [(0.0, "PR-SGD")] + [(mu, f"RI-SGD mu={mu:g}") for mu in g.fail_mus]
    numbers, rows, checks = {"fail_round": g.fail_round, "settings": {}}, [], []
    for s_count in g.fail_counts:
        for mu, name in algs:
            setting = f[(mu, s_count)]
            nums = setting_numbers(ctx, setting, exp.seeds)
            nums["down_ranks"] = list(setting.down)
            numbers["settings"][f"{name}, s={s_count}"] = nums
            rows.append([str(s_count), ", ".join(map(str, setting.down)) or "-", name,
                         fmt(nums["final_test_acc"]), fmt(nums["min_data_coverage"], ".3f")])
        if s_count:
            for mu, name in algs[1:]:
                checks.append(V.paired(f"s={s_count}: {name} above PR-SGD, final test accuracy",
                                       ctx.values(f[(mu, s_count)], exp.seeds, final_acc),
                                       ctx.values(f[(0.0, s_count)], exp.seeds, final_acc), V.ACC_MARGIN,
                                       detail="points per seed"))
    table = md_table(["s (ranks down)", "which ranks", "algorithm", "final test acc", "min data coverage"], rows)
    panels = []
    for metric, ylabel in (("final_test_acc", "final test accuracy (%)"),
                           ("min_data_coverage", "data coverage of the live ranks")):
        lines = [(name, list(g.fail_counts), by_seed(ctx, [f[(mu, s)] for s in g.fail_counts], exp.seeds,
                                                     lambda r, m=metric: r["summary"][m] or 0.0))
                 for mu, name in algs]
        panels.append({"xlabel": f"s: workers down from round {g.fail_round}", "ylabel": ylabel, "lines": lines})
    plot = xy_plot(ctx, "sec44_failures.png", f"Section 4.4 here: failed workers ({g.partition}, tau={g.tau})",
                   panels)
    top = max(g.fail_counts)
    head = f"final acc with s={top} down: " + ", ".join(
        f"{name} {numbers['settings'][f'{name}, s={top}']['final_test_acc']['mean']:.2f} (coverage "
        f"{numbers['settings'][f'{name}, s={top}']['min_data_coverage']['mean'] or 0:.2f})" for _, name in algs)
    return Analysis(exp, checks, numbers, table, plot, headline=head)


def analyse_theory(ctx: Context, exp: Experiment) -> Analysis:
    g = ctx.grid
    numbers, checks, rows = {"by_mu": {}, "by_tau": {}}, [], []

    def div(setting: Setting) -> dict[int, float]:
        return ctx.values(setting, g.seeds_of(exp, setting), lambda r: r["summary"]["divergence_mean"])

    def log_div(setting: Setting) -> dict[int, float]:  # compared as log10 ratios (floored: 0 stays finite)
        return {seed: math.log10(max(v, 1e-30)) for seed, v in div(setting).items()}

    mus = sorted(g.mus)
    for part in g.partitions:
        settings = g.fig2(part)
        for mu in mus:
            numbers["by_mu"][f"{part},mu={mu:g}"] = spread(div(settings[mu]))
            rows.append([part, f"tau={g.tau}", f"mu={mu:g}", fmt(spread(div(settings[mu])), ".2e")])
        for a, b in zip(mus, mus[1:]):
            checks.append(V.paired(f"{part}, tau={g.tau}: divergence smaller at mu={b:g} than at mu={a:g} "
                                   "(at least 10%)", log_div(settings[b]), log_div(settings[a]), V.DIV_MARGIN,
                                   lower_is_better=True,
                                   detail="log10(div at lower mu / div at higher mu) per seed"))
    sweep, swept = g.tau_sweep(), [t for t in g.taus if t != g.steps]
    for mu, name in ((0.0, "PR-SGD"), (g.tau_mu, f"RI-SGD mu={g.tau_mu:g}")):
        for t in g.sweep_taus():
            numbers["by_tau"][f"{name},tau={t}"] = spread(div(sweep[(mu, t)]))
            rows.append([g.partition, f"tau={t}", name, fmt(spread(div(sweep[(mu, t)])), ".2e")])
        lo, hi = min(swept), max(swept)
        checks.append(V.paired(f"{name}: divergence grows with tau (tau={hi} above tau={lo}, at least 10%)",
                               log_div(sweep[(mu, hi)]), log_div(sweep[(mu, lo)]), V.DIV_MARGIN,
                               detail="log10 ratio per seed"))
    table = md_table(["partition", "tau", "setting", "mean divergence before averaging"], rows)
    panels = []
    lines = [(part, mus, by_seed(ctx, [g.fig2(part)[mu] for mu in mus], g.seeds_main,
                                 lambda r: r["summary"]["divergence_mean"])) for part in g.partitions]
    panels.append({"xlabel": "mu (redundancy)", "ylabel": "mean divergence before averaging", "ylog": True,
                   "lines": lines, "title": f"against mu (tau={g.tau})"})
    lines = [(name, list(g.sweep_taus()), by_seed(ctx, [sweep[(mu, t)] for t in g.sweep_taus()], g.seeds_other,
                                                  lambda r: r["summary"]["divergence_mean"]))
             for mu, name in ((0.0, "PR-SGD"), (g.tau_mu, f"RI-SGD mu={g.tau_mu:g}"))]
    panels.append({"xlabel": "tau", "ylabel": "mean divergence before averaging", "xlog": True, "ylog": True,
                   "lines": lines, "title": f"against tau ({g.partition})"})
    # the divergence before each average along the run (Fig. 2's settings, first partition)
    first = g.partitions[0]
    lines = []
    for mu in mus:
        runs = list(ctx.of(g.fig2(first)[mu], g.seeds_main).values())
        n = min(len(r["metrics"]) for r in runs)
        lines.append((f"mu={mu:g}", [statistics.fmean(r["metrics"][k]["round"] for r in runs) for k in range(n)],
                      [[max(r["metrics"][k]["divergence"] or 0.0, 1e-12) for k in range(n)] for r in runs]))
    panels.append({"xlabel": "round", "ylabel": "divergence before the average", "ylog": True, "lines": lines,
                   "title": f"along the run ({first}, tau={g.tau})"})
    plot = xy_plot(ctx, "theory_divergence.png", "Residual error here: divergence mean_j ||x_j - x||^2 / ||x||^2 "
                   "before each average", panels)
    notes = ["Prediction (Theorem 4.2): the residual term grows with (tau - 1) and shrinks as gamma = 1/p + mu grows "
             "toward 1 (full redundancy gives Cooperative SGD's bound)."]
    ends = [numbers["by_mu"][f"{first},mu={mu:g}"]["mean"] for mu in (mus[0], mus[-1])]
    head = (f"predicted: shrinks with mu, grows with tau; measured ({first}, tau={g.tau}): "
            f"{ends[0]:.1e} at mu={mus[0]:g} -> {ends[1]:.1e} at mu={mus[-1]:g}")
    return Analysis(exp, checks, numbers, table, plot, notes, head)


ANALYSES = {"fig2": analyse_fig2, "tau": analyse_tau, "diversity": analyse_diversity,
            "saturation": analyse_saturation, "failures": analyse_failures, "theory": analyse_theory}


# -- the report -------------------------------------------------------------------------------------

RULES = f"""Fixed before any run was looked at (`recipes/paper_verdict.py`); the grid, the split, the schedule
and the seeds were not changed after. Each claim is split into checks. A check compares two settings
seed by seed: `diff` is the advantage of the setting the paper says is better (positive supports the
claim), `margin` the smallest advantage that counts as an effect:

| mean diff over seeds | every seed's diff > 0 | some seed's diff <= 0 |
|---|---|---|
| > margin | confirmed | mixed |
| <= margin | mixed | not confirmed |

Margins: test accuracy {V.ACC_MARGIN} points; rounds to a target 0 (a baseline that never reaches it
counts as its total rounds + 1, a lower bound; a seed on which the claimed setting never reaches it
counts as a saving of at most 0); divergence compared as log10 ratios, margin log10(1.1) (at least
10%).
"Close to SyncSGD" means within {V.TARGET_GAP} point of SyncSGD's final accuracy (seed mean); the target
for "rounds to SyncSGD" is SyncSGD's final accuracy (seed mean) minus {V.TARGET_GAP} point. The knee of
the tau sweep is the largest tau whose seed-mean accuracy is within {V.KNEE_GAP} point of the best tau's;
checks on a knee are yes/no (confirmed / not confirmed). An experiment is confirmed when all its
checks are, not confirmed when none is, mixed otherwise."""


def scale_table(grid: Grid, cfg: dict, index: dict | None) -> str:
    if index:
        train = index["splits"]["train"]["samples"]
        val = index["splits"].get("val", {}).get("samples", 0)
        shape = "x".join(map(str, index.get("image_shape") or [])) or "variable"
        data = f"{index['dataset']} ({train:,} train, {val:,} test, {shape}, {index['num_classes']} classes)"
    else:
        data = cfg["data"]["dataset"]
    try:
        import risgd_models

        params = f" ({risgd_models.model_bytes(cfg['model']['name']) / 4 / 1e6:.2f}M parameters and buffers)"
    except Exception:  # a model timm cannot build here without its weights or options: name only
        params = ""
    p, b = grid.ranks, grid.base_batch
    rows = [
        ["data", "CIFAR-10 (50,000 train, 10,000 test, 3x32x32) and CIFAR-100; ImageNet in Appendix A", data],
        ["model", "ResNet-44 (0.66M parameters)", cfg["model"]["name"] + params],
        ["iterations", "45,000 (CIFAR-10), 80,000 (CIFAR-100)", f"{grid.steps:,}"],
        ["workers", "4 GPUs (V100 / GTX 1080 Ti), TensorFlow", f"{p} ranks ({device()}), DeepSpeed"],
        ["SyncSGD batch", "128 (32 per worker)", f"{p * b} ({b} per rank)"],
        ["learning rate", "0.1, step decay (authors' code)",
         f"{cfg['optimizer']['lr']:g}, {cfg['schedule']['kind']} schedule (the recipe's)"],
        ["heterogeneous mu", "mu_j ~ N(mu, 0.01)", f"mu_j ~ N(mu, {grid.hetero_std:g}) for RI-SGD (not for mu=0, "
                                                   "nor for full redundancy, which must hold every chunk)"],
        ["Fig. 2 grid", "mu in {0, 0.1, 0.25, 0.5}, tau=50",
         f"mu in {{{', '.join(f'{m:g}' for m in grid.mus)}}}, tau={grid.tau}, partitions "
         f"{', '.join(grid.partitions)}"],
        ["tau sweep", "Appendix A", f"tau in {{{', '.join(str(t) for t in grid.taus if t != grid.steps)}}} and "
                                    f"tau={grid.steps} "
                                    "(no averaging until the end)"],
        ["Fig. 3 / Fig. 4 batch", "512 (128 per worker)", f"{p * b * grid.batch_factor} ({b * grid.batch_factor} "
                                                           "per rank)"],
        ["failures", "theory only (section 4.4)", f"s in {{{', '.join(map(str, grid.fail_counts))}}} ranks down "
                                                  f"from round {grid.fail_round}"],
        ["seeds", "not stated (one curve per setting)", f"Fig. 2: {len(grid.seeds_main)} "
                                                        f"({', '.join(map(str, grid.seeds_main))}); elsewhere: "
                                                        f"{len(grid.seeds_other)} "
                                                        f"({', '.join(map(str, grid.seeds_other))})"],
        ["evaluation", "not stated", f"every {grid.eval_every} steps (at the first average at or after), on the "
                                     "whole test split"],
    ]
    return md_table(["", "paper", "here"], rows)


def device() -> str:
    import torch

    return f"{torch.cuda.get_device_name(0)} GPUs" if torch.cuda.is_available() else "CPU processes, gloo"


def analyse(grid: Grid, runs: dict[str, dict], out_dir: str) -> list[Analysis]:
    ctx = Context(grid, runs, out_dir)
    return [ANALYSES[exp.key](ctx, exp) for exp in grid.experiments()]


def verdict_table(analyses: list[Analysis]) -> str:
    """The fixed-width table the command prints."""
    head = f"{'experiment':<62} {'verdict':<14} checks (confirmed / mixed / not confirmed)"
    lines = [head, "-" * len(head)]
    for a in analyses:
        counts = [sum(c.verdict == v for c in a.checks) for v in (V.CONFIRMED, V.MIXED, V.NOT_CONFIRMED)]
        lines.append(f"{a.exp.title:<62} {a.verdict:<14} {counts[0]} / {counts[1]} / {counts[2]}")
        if a.headline:
            lines.append(f"    {a.headline}")
    return "\n".join(lines)


def _check_rows(checks: list[V.Check]) -> str:
    rows = []
    for c in checks:
        per_seed = ", ".join(f"{d:+.3g}" for d in c.diffs) if c.diffs else "-"
        mean = "-" if c.mean is None else f"{c.mean:+.3g}"
        margin = "-" if c.margin is None else f"{c.margin:.3g}"
        rows.append([c.name, per_seed, mean, margin, c.detail, f"**{c.verdict}**"])
    return md_table(["check", "diff per seed", "mean", "margin", "diff is", "verdict"], rows)


def write(grid: Grid, cfg: dict, runs: dict[str, dict], out_dir: str, command: str, index: dict | None,
          timing: dict) -> list[Analysis]:
    """Analyse, plot, and write ``paper.md`` and ``paper.json`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    analyses = analyse(grid, runs, out_dir)
    exps = grid.experiments()
    md = [f"# The RI-SGD paper, experiment by experiment, on `{cfg['recipe']}`", "",
          "Haddadpour, Kamani, Mahdavi and Cadambe, *Trading Redundancy for Communication: Speeding up Distributed "
          "SGD for Non-convex Optimization*, ICML 2019. Every experiment of its section 5 and Appendix A re-run here; "
          "each verdict is computed by `recipes/paper_verdict.py` from the runs.", "",
          f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `{command}`: grid `{grid.name}`, "
          f"{grid.ranks} ranks, {len(grid.runs())} runs under `{timing['runs_dir']}` "
          f"({timing['trained']} trained by this command, {timing['launches']} launch(es), "
          f"{timing['seconds']:.0f} s; the runs' own wall-clock adds up to {timing['run_seconds']:.0f} s).", "",
          "## Verdicts", "",
          md_table(["experiment", "claim", "verdict", "key numbers (seed means)"],
                   [[a.exp.title, a.exp.claim, f"**{a.verdict}**", a.headline] for a in analyses]), "",
          "## What was scaled down against the paper", "", scale_table(grid, cfg, index), "",
          "## How the verdicts are decided", "", RULES, ""]
    for i, a in enumerate(analyses, start=1):
        md += [f"## {i}. {a.exp.title}", "", f"**Claim.** {a.exp.claim}", "", f"**Here.** {a.exp.setup}", "",
               f"**Verdict: {a.verdict}.** Seeds: {', '.join(map(str, a.exp.seeds))}.", "", a.table, ""]
        if a.plot:
            md += [f"![{a.exp.title}]({a.plot})", ""]
        md += [_check_rows(a.checks), ""]
        md += [f"- {n}" for n in a.notes] + ([""] if a.notes else [])
    all_runs = [runs[s.run_name(seed)] for s, seed in grid.runs()]
    md += ["## Every run", "", "```", compare.table(all_runs), "```", ""]
    write_text_atomic(os.path.join(out_dir, "paper.md"), "\n".join(md))

    def run_records(exp: Experiment) -> list[dict]:
        return [{"name": s.run_name(seed), "dir": runs[s.run_name(seed)]["dir"], "setting": s.label(),
                 "seed": seed, "summary": runs[s.run_name(seed)]["summary"]}
                for s in exp.settings for seed in grid.seeds_of(exp, s)]

    doc = {"paper": "Haddadpour et al., ICML 2019 (RI-SGD)", "recipe": cfg["recipe"], "grid": grid.name,
           "ranks": grid.ranks, "steps": grid.steps, "command": command, "timing": timing,
           "rules": {"acc_margin": V.ACC_MARGIN, "target_gap": V.TARGET_GAP, "rounds_margin": V.ROUNDS_MARGIN,
                     "div_margin_log10": V.DIV_MARGIN, "knee_gap": V.KNEE_GAP},
           "experiments": [{"key": a.exp.key, "name": a.exp.title, "claim": a.exp.claim, "setup": a.exp.setup,
                            "verdict": a.verdict, "headline": a.headline,
                            "numbers": {**a.numbers, "checks": [c.as_dict() for c in a.checks]},
                            "plot": a.plot, "runs": run_records(exp)} for a, exp in zip(analyses, exps)]}
    write_text_atomic(os.path.join(out_dir, "paper.json"), json.dumps(doc, indent=1, default=str) + "\n")
    return analyses
