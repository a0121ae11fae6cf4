"""Section 4.4: failed workers. Its settings, the paper's claim and the analysis.

s consecutive ranks (1..s) down from a round on, for each s of the grid, PR-SGD against RI-SGD at
each of the grid's fail_mus; the verdict asks whether RI-SGD ends above PR-SGD with the same s.
"""

from __future__ import annotations

from .. import verdict as V
from ..analysis import Analysis, Context, against_prsgd, by_seed, final_acc, fmt, md_table, setting_numbers
from ..grid import Experiment, Grid
from ..plots import xy_plot
from ..registry import register

TITLE = "Section 4.4: failed workers"
CLAIM = ("Section 4.4: when s failed workers are ignored, \"by proper choice of gamma ... taking advantage of the "
         "data redundancy, RI-SGD(tau) is resilient against failures\" (a lower error than PR-SGD with the same s).")


def settings_of(g: Grid) -> dict:
    """PR-SGD and RI-SGD at each fail_mu, keyed (mu, s), with ranks 1..s down from the grid's fail_round."""
    return {(mu, s): g.local(g.partition, mu, down=tuple(range(1, s + 1)), fail_round=g.fail_round)
            for s in g.fail_counts for mu in (0.0, *g.fail_mus)}


@register(order=50)
def experiment(g: Grid) -> Experiment:
    fail_mus = ", ".join(f"{m:g}" for m in g.fail_mus)
    downs = "; ".join(f"s={s}: ranks {list(range(1, s + 1))}" for s in g.fail_counts if s)
    setup = (f"{downs} of {g.ranks} down from round {g.fail_round} (consecutive ranks: the harder case for "
             f"cyclic placement), PR-SGD against RI-SGD mu in {{{fail_mus}}}, tau={g.tau}, {g.partition}.")
    return Experiment("failures", TITLE, CLAIM, setup, g.seeds_other, tuple(settings_of(g).values()), analyse)


def analyse(ctx: Context, exp: Experiment) -> Analysis:
    g = ctx.grid
    f = settings_of(g)
    algs = against_prsgd(g.fail_mus)
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
                                       detail="points per seed", on=(f[(mu, s_count)], f[(0.0, s_count)])))
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
