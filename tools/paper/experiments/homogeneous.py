"""Homogeneous against heterogeneous redundancy. Its settings, the paper's claim and the analysis.

The paper's main theorems are for homogeneous redundancy (every worker holds the same share of the
data, section 3); its experiments all use heterogeneous redundancy, mu_j ~ N(mu, 0.01) per worker
(section 5.1; the heterogeneous analysis is its Appendix D). The paper does not compare the two: what
it relies on is that its experiments stand for the setting its theorems analyse. The check here asks
whether they do: RI-SGD with mu_j = mu for every worker (hetero_std 0) against the grid's heterogeneous
RI-SGD (Fig. 2's runs), per seed, for final test accuracy and the divergence before averaging; each is
confirmed when the mean absolute difference lies within the margin (95% interval).
"""

from __future__ import annotations

import math
from dataclasses import replace

from .. import verdict as V
from ..analysis import Analysis, Context, by_seed, final_acc, fmt, md_table, setting_numbers
from ..grid import Experiment, Grid
from ..plots import xy_plot
from ..registry import register

TITLE = "Section 5.1 / 3: homogeneous against heterogeneous mu"
CLAIM = ("Section 3: the analysis is \"in homogeneous redundancy setting\" (the heterogeneous one is deferred to "
         "Appendix D); section 5.1: \"All the experiments are based on heterogeneous mini-batch samples introduced "
         "in Section D. Hence, the redundancy value for each worker node is picked from a normal distribution with "
         "the mean of the reported redundancy value\". The paper does not compare the two; judged here: the "
         "heterogeneous runs stand for the homogeneous setting (the same accuracy and divergence within the "
         "margins).")


def mus_of(g: Grid) -> list[float]:
    """The RI-SGD mus compared: the grid's tau_mu and its largest Fig. 2 mu (below full redundancy)."""
    return sorted({mu for mu in (g.tau_mu, max(g.mus)) if 0 < mu})


def settings_of(g: Grid) -> dict:
    """Keyed (mu, "hetero") (Fig. 2's RI-SGD) and (mu, "homo") (the same with hetero_std 0)."""
    out = {}
    for mu in mus_of(g):
        hetero = g.local(g.partition, mu)
        out[(mu, "hetero")] = hetero
        out[(mu, "homo")] = replace(hetero, hetero_std=0.0)
    return out


@register(order=70)
def experiment(g: Grid) -> Experiment:
    mus = ", ".join(f"{m:g}" for m in mus_of(g))
    setup = (f"RI-SGD at mu in {{{mus}}}, tau={g.tau}, {g.partition}: homogeneous (mu_j = mu on every worker) "
             f"against heterogeneous (mu_j ~ N(mu, {g.hetero_std:g}), Fig. 2's runs), the same per-chunk batch "
             f"{g.base_batch}. A check is confirmed when the mean over seeds of |homogeneous - heterogeneous| lies "
             "below its margin (95% interval): this tests that the two agree, not which is better.")
    return Experiment("homogeneous", TITLE, CLAIM, setup, g.seeds_other, tuple(settings_of(g).values()), analyse)


def _log_div(run: dict) -> float:
    return math.log10(max(run["summary"]["divergence_mean"] or 0.0, 1e-30))


def analyse(ctx: Context, exp: Experiment) -> Analysis:
    g, s = ctx.grid, settings_of(ctx.grid)
    numbers, rows, checks = {"settings": {}}, [], []
    for mu in mus_of(g):
        for kind in ("homo", "hetero"):
            nums = setting_numbers(ctx, s[(mu, kind)], exp.seeds)
            numbers["settings"][f"mu={mu:g},{kind}"] = nums
            std = 0.0 if kind == "homo" else g.hetero_std
            rows.append([f"{mu:g}", f"{'homogeneous' if kind == 'homo' else 'heterogeneous'} (std {std:g})",
                         fmt(nums["final_test_acc"]), fmt(nums["final_train_loss"], ".4f"),
                         fmt(nums["divergence_mean"], ".2e")])
        for what, fn, margin, unit in (("final test accuracy", final_acc, V.ACC_MARGIN, "points"),
                                       ("divergence before averaging", _log_div, V.DIV_MARGIN, "log10 ratio")):
            homo = ctx.values(s[(mu, "homo")], exp.seeds, fn)
            hetero = ctx.values(s[(mu, "hetero")], exp.seeds, fn)
            seeds = sorted(set(homo) & set(hetero))
            within = {seed: margin - abs(homo[seed] - hetero[seed]) for seed in seeds}
            checks.append(V.measured(
                f"mu={mu:g}: homogeneous and heterogeneous agree in {what} (|difference| below {margin:.3g} {unit})",
                within, 0.0, detail=f"margin - |homogeneous - heterogeneous| per seed ({unit})",
                on=(s[(mu, "homo")], s[(mu, "hetero")])))
    table = md_table(["mu", "redundancy", "final test acc", "final train loss", "mean divergence"], rows)
    mus = mus_of(g)
    panels = []
    for ylabel, fn, ylog in (("final test accuracy (%)", final_acc, False),
                             ("mean divergence before averaging", lambda r: r["summary"]["divergence_mean"] or 1e-12,
                              True)):
        lines = [(f"{'homogeneous' if kind == 'homo' else 'heterogeneous'} mu", mus,
                  by_seed(ctx, [s[(mu, kind)] for mu in mus], exp.seeds, fn)) for kind in ("homo", "hetero")]
        panels.append({"xlabel": "mu (redundancy)", "ylabel": ylabel, "ylog": ylog, "lines": lines})
    plot = xy_plot(ctx, "homogeneous_mu.png", f"Homogeneous vs heterogeneous mu ({g.partition}, tau={g.tau})",
                   panels)
    acc = numbers["settings"]
    head = "final acc homogeneous / heterogeneous: " + ", ".join(
        f"mu={mu:g} {acc[f'mu={mu:g},homo']['final_test_acc']['mean']:.2f} / "
        f"{acc[f'mu={mu:g},hetero']['final_test_acc']['mean']:.2f}" for mu in mus)
    notes = [f"The heterogeneous std here is {g.hetero_std:g} (the paper's code's sigma): a worker's share differs "
             "from the mean by about that fraction of the data, so a large difference is not expected; the check "
             "asks whether the runs show one larger than the margins. The absolute difference per seed includes "
             "the seeds' noise, so agreement is harder to confirm than a difference of zero would suggest."]
    return Analysis(exp, checks, numbers, table, plot, notes, head)
