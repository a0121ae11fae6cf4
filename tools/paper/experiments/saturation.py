"""Fig. 4: escaping saturation at a larger batch. Its settings, the paper's claim and the analysis.

PR-SGD against RI-SGD, both at batch_factor times the base batch per rank (RI-SGD splits it over its
chunks), and the same two at the base batch for reference; the verdict asks whether RI-SGD ends
above PR-SGD at the larger batch.
"""

from __future__ import annotations

from ... import compare
from .. import verdict as V
from ..analysis import Analysis, Context, batch_text, final_acc, fmt, settings_table, spread
from ..grid import Experiment, Grid
from ..plots import curves
from ..registry import register

CLAIM = ("Fig. 4 (ResNet-44 on CIFAR-10, tau=50, batch 512 for both): \"redundancy can help to escape saturation by "
         "introducing gradient diversity, hence, can achieve a better performance\" than PR-SGD.")


def settings_of(g: Grid) -> dict:
    """PR-SGD and RI-SGD at the larger batch (keys prsgd_big, risgd_big) and at the base batch (prsgd, risgd)."""
    big = g.base_batch * g.batch_factor
    return {"prsgd_big": g.local(g.partition, 0.0, base_batch=big),
            "risgd_big": g.local(g.partition, g.tau_mu, base_batch=big, batch_policy="split"),
            "prsgd": g.local(g.partition, 0.0), "risgd": g.local(g.partition, g.tau_mu)}


@register(order=40)
def experiment(g: Grid) -> Experiment:
    b, big = g.base_batch, g.batch_factor
    setup = (f"PR-SGD against RI-SGD mu={g.tau_mu:g}, both at {b * big} per rank ({big}x the base batch; "
             f"RI-SGD splits it over its chunks), tau={g.tau}, {g.partition}; the same two at batch {b} "
             "for reference.")
    return Experiment("saturation", f"Fig. 4: escaping saturation at a {big}x batch", CLAIM, setup, g.seeds_other,
                      tuple(settings_of(g).values()), analyse)


def analyse(ctx: Context, exp: Experiment) -> Analysis:
    g, s = ctx.grid, settings_of(ctx.grid)
    numbers = {"settings": {}}
    table = settings_table(ctx, exp, list(s.items()), numbers)
    big = s["prsgd_big"].base_batch
    checks = [V.paired(f"RI-SGD mu={g.tau_mu:g} above PR-SGD at the same per-rank batch {big}, final test accuracy",
                       ctx.values(s["risgd_big"], exp.seeds, final_acc),
                       ctx.values(s["prsgd_big"], exp.seeds, final_acc), V.ACC_MARGIN, detail="points per seed",
                       on=(s["risgd_big"], s["prsgd_big"]))]
    big_acc, small_acc = (ctx.values(s[k], exp.seeds, final_acc) for k in ("prsgd_big", "prsgd"))
    premise = {k: big_acc[k] - small_acc[k] for k in sorted(set(big_acc) & set(small_acc))}
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
