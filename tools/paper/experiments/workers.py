"""The number of workers p: does the gain of redundancy grow with p? Its settings, the paper's claim and
the analysis.

Every run of the grid shares one launch at one world size (``grid.ranks``), so p varies here through
the engine's node level: with ``node_size`` n the R ranks form R / n workers, each node one worker
whose n ranks average their gradients every step (one synchronous worker of n ranks) and whose
models are averaged across workers every tau. To keep the worker the same at every p, a rank draws
base_batch / n per chunk, so a worker draws base_batch per chunk at every p (its n ranks together).
The data set is the same at every p, split into p chunks. What changes with p besides p: the total
samples per step (p workers x the worker's batch), and at a fixed mu the share of the data a worker
holds (gamma = 1/p + mu). p above the grid's world size (the paper's 8 GPUs on ImageNet, Appendix A)
gets a launch of its own (``grid.wide_ranks``, 8 ranks: p = 8 workers of one rank each, base_batch per
chunk per rank), the only runs of the report at another world size.

The verdict asks, at the grid's tau_mu, whether RI-SGD ends above PR-SGD at each p, and whether that
gain (RI-SGD minus PR-SGD, per seed) is larger at the larger p.
"""

from __future__ import annotations

from dataclasses import replace

from .. import verdict as V
from ..analysis import Analysis, Context, by_seed, final_acc, fmt, md_table, setting_numbers, spread
from ..grid import Experiment, Grid
from ..plots import xy_plot
from ..registry import register

TITLE = "Theorem 4.2 / Remark 1: the number of workers p"
CLAIM = ("Remark 1: \"for larger p and fixed number of the data points the variance reduces\"; Theorem 4.2's "
         "bound (7) carries the term 2p^2(1 - gamma)beta, which redundancy mu lowers by 2p^2 mu beta at "
         "gamma = 1/p + mu, a reduction growing with p. The paper states no experiment on p in words (Appendix A "
         "trains ImageNet on 4 and 8 GPUs); judged here, as derived from (7): the gain of RI-SGD over PR-SGD at the "
         "same mu is larger with more workers.")


def workers_of(g: Grid) -> list[int]:
    """The p that one launch of grid.ranks ranks can hold: R / n workers for each node size n dividing R and
    the base batch, with at least 2 workers and tau_mu within p's range of mu; and grid.wide_ranks (one rank
    per worker, a launch of its own) where the grid has one."""
    out = [g.wide_ranks] if g.wide_ranks and g.tau_mu <= (g.wide_ranks - 1) / g.wide_ranks + 1e-9 else []
    for n in range(1, g.ranks + 1):
        p = g.ranks // n
        if g.ranks % n or g.base_batch % n or p < 2 or g.tau_mu > (p - 1) / p + 1e-9:
            continue
        out.append(p)
    return sorted(out)


def settings_of(g: Grid) -> dict:
    """PR-SGD (key (p, 0.0)) and RI-SGD at tau_mu (key (p, tau_mu)) for each p; p = grid.ranks are Fig. 2's runs."""
    out = {}
    for p in workers_of(g):
        n = per_worker(g, p)
        for mu in (0.0, g.tau_mu):
            s = g.local(g.partition, mu)
            if p > g.ranks:  # the wide launch: p ranks, one per worker
                out[(p, mu)] = replace(s, ranks=p)
            else:
                out[(p, mu)] = s if n == 1 else replace(s, node_size=n, base_batch=g.base_batch // n)
    return out


def per_worker(g: Grid, p: int) -> int:
    """Ranks per worker at p workers (1 in the wide launch)."""
    return 1 if p > g.ranks else g.ranks // p


@register(order=90)
def experiment(g: Grid) -> Experiment:
    ps = workers_of(g)
    parts = [f"p={p}: {per_worker(g, p)} rank(s) per worker, {g.base_batch // per_worker(g, p)} per chunk per rank"
             + (f", a launch of {p} ranks of its own" if p > g.ranks else "") for p in ps]
    untested = ("" if len(ps) > 1 else
                f" With {g.ranks} ranks only p={ps[0]} fits: whether the gain grows with p is not tested here "
                "(4 ranks give p=2 and p=4, and the full grid adds p=8 in a launch of 8 ranks).")
    where = (f"all in the one launch of {g.ranks} ranks" if max(ps) <= g.ranks else
             f"p <= {g.ranks} in the grid's launch of {g.ranks} ranks, p={g.wide_ranks} in a launch of {g.wide_ranks}")
    setup = (f"PR-SGD against RI-SGD mu={g.tau_mu:g} at p in {{{', '.join(map(str, ps))}}} workers, {where} "
             f"({'; '.join(parts)}: {g.base_batch} per chunk per worker at every p), "
             f"tau={g.tau}, {g.partition}, the same data split into p chunks. The total samples per step grow with p "
             f"and, at a fixed mu, a worker's share of the data (1/p + mu) shrinks; the largest p tested is "
             f"{max(ps)}.{untested}")
    return Experiment("workers", TITLE, CLAIM, setup, g.seeds_other, tuple(settings_of(g).values()), analyse)


def analyse(ctx: Context, exp: Experiment) -> Analysis:
    g = ctx.grid
    s, ps = settings_of(g), workers_of(g)
    numbers, rows, checks, gains = {"workers": ps, "settings": {}, "gain": {}}, [], [], {}
    for p in ps:
        for mu in (0.0, g.tau_mu):
            nums = setting_numbers(ctx, s[(p, mu)], exp.seeds)
            numbers["settings"][f"p={p},mu={mu:g}"] = nums
            rows.append([str(p), str(per_worker(g, p)), s[(p, mu)].label(), f"{s[(p, mu)].base_batch}",
                         fmt(nums["final_test_acc"]), fmt(nums["divergence_mean"], ".2e"),
                         fmt(nums["wall_seconds"], ".1f")])
        ri = ctx.values(s[(p, g.tau_mu)], exp.seeds, final_acc)
        pr = ctx.values(s[(p, 0.0)], exp.seeds, final_acc)
        gains[p] = {seed: ri[seed] - pr[seed] for seed in sorted(set(ri) & set(pr))}
        numbers["gain"][f"p={p}"] = spread(gains[p])
        checks.append(V.paired(f"p={p}: RI-SGD mu={g.tau_mu:g} above PR-SGD, final test accuracy", ri, pr,
                               V.ACC_MARGIN, detail="points per seed", on=(s[(p, g.tau_mu)], s[(p, 0.0)])))
    for a, b in zip(ps, ps[1:]):
        seeds = sorted(set(gains[a]) & set(gains[b]))
        checks.append(V.measured(f"the gain of redundancy (RI-SGD mu={g.tau_mu:g} minus PR-SGD) is larger at p={b} "
                                 f"than at p={a} (by more than {V.ACC_MARGIN:g} pt)",
                                 {seed: gains[b][seed] - gains[a][seed] for seed in seeds}, V.ACC_MARGIN,
                                 detail=f"gain at p={b} minus gain at p={a}, points per seed",
                                 on=(s[(b, g.tau_mu)], s[(b, 0.0)], s[(a, g.tau_mu)], s[(a, 0.0)])))
    table = md_table(["p (workers)", "ranks per worker", "setting", "batch per chunk per rank", "final test acc",
                      "mean divergence", "wall s"], rows)
    panels = [{"xlabel": "p (workers)", "ylabel": "final test accuracy (%)",
               "lines": [(name, ps, by_seed(ctx, [s[(p, mu)] for p in ps], exp.seeds, final_acc))
                         for mu, name in ((0.0, "PR-SGD"), (g.tau_mu, f"RI-SGD mu={g.tau_mu:g}"))]},
              {"xlabel": "p (workers)", "ylabel": "gain: RI-SGD minus PR-SGD (points)",
               "lines": [("gain", ps, [[gains[p][seed] for p in ps] for seed in exp.seeds])]}]
    plot = xy_plot(ctx, "workers_p.png", f"The number of workers ({g.partition}, tau={g.tau})",
                   panels)
    head = "gain of RI-SGD over PR-SGD: " + ", ".join(f"p={p} {numbers['gain'][f'p={p}']['mean']:+.2f} pt" for p in ps)
    notes = ["A worker of n > 1 ranks is synchronous inside (a gradient all-reduce every step): it computes what one "
             "worker with n times a rank's batch would, except that BatchNorm normalises over each rank's own samples."]
    if max(ps) > g.ranks:
        notes.append(f"p={g.wide_ranks} trains in a launch of {g.wide_ranks} ranks on the same cores: its wall-clock "
                     "is not comparable with the other rows'; its accuracy is.")
    if len(ps) < 2:
        notes.append("Only one p fits this world size: the growth with p is not judged.")
    return Analysis(exp, checks, numbers, table, plot, notes, head)
