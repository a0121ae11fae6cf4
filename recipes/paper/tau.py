"""Appendix A: the number of local steps tau. Its settings, the paper's claim and the analysis.

PR-SGD and RI-SGD at each tau of the grid and at tau = steps (no average until the end), on the
recipe's partition; the verdict asks whether accuracy falls as tau grows, where the knee of the
sweep is, and whether redundancy helps when nothing is averaged until the end.
"""

from __future__ import annotations

import statistics

from . import verdict as V
from .analysis import Analysis, Context, against_prsgd, by_seed, final_acc, fmt, md_table, setting_numbers
from .grid import Experiment, Grid
from .plots import xy_plot

TITLE = "Appendix A: the number of local steps tau"
CLAIM = ("Section 5.2 / Appendix A: as tau goes up \"the accuracy goes down, however the number of communication "
         "rounds and hence the time for execution reduces\"; tau \"around 50\" is the best trade-off on CIFAR; with "
         "no averaging step in the middle of training, \"redundancy can, indeed, improve the convergence rate\".")


def swept_taus(g: Grid) -> list[int]:
    """The grid's taus below the run length."""
    return [t for t in g.taus if t != g.steps]


def sweep_taus(g: Grid) -> tuple[int, ...]:
    """The swept taus, then tau = steps: no averaging until the end."""
    return tuple(swept_taus(g)) + (g.steps,)


def settings_of(g: Grid) -> dict:
    """PR-SGD and RI-SGD at the grid's tau_mu, keyed (mu, tau), at every tau of the sweep."""
    return {(mu, t): g.local(g.partition, mu, t) for mu in (0.0, g.tau_mu) for t in sweep_taus(g)}


def experiment(g: Grid) -> Experiment:
    setup = (f"PR-SGD and RI-SGD mu={g.tau_mu:g} at tau in {{{', '.join(map(str, swept_taus(g)))}}} and at "
             f"tau={g.steps} (one average, at the end), {g.partition}, {g.steps} iterations.")
    return Experiment("tau", TITLE, CLAIM, setup, g.seeds_other, tuple(settings_of(g).values()), analyse)


def analyse(ctx: Context, exp: Experiment) -> Analysis:
    g = ctx.grid
    taus, swept = sweep_taus(g), swept_taus(g)
    algs = against_prsgd([g.tau_mu])
    sweep = settings_of(g)
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
