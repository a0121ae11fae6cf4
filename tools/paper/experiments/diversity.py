"""Fig. 3: full redundancy against cooperative SGD. Its settings, the paper's claim and the analysis.

RI-SGD with full redundancy (every rank holds every chunk) against Coop-SGD (every rank samples the
whole set) at the same per-rank batch; the verdict asks whether RI-SGD ends above it.
"""

from __future__ import annotations

from dataclasses import replace

from ... import compare
from .. import verdict as V
from ..analysis import Analysis, Context, final_acc, settings_table
from ..grid import Experiment, Grid, Setting
from ..plots import curves
from ..registry import register

TITLE = "Fig. 3: full redundancy against cooperative SGD"
CLAIM = ("Fig. 3 (ResNet-44 on CIFAR-10, tau=50, batch 512 for both): \"RI-SGD with full redundancy can outperform "
         "the simple model averaging with every node having access to all data\" (cooperative SGD), through the "
         "diversity of its mini-batches.")


def settings_of(g: Grid) -> dict:
    """RI-SGD at full redundancy (key "full") and Coop-SGD at p times the base batch (key "coop")."""
    full = replace(g.local(g.partition, g.full_mu), hetero_std=0.0)  # every rank holds every chunk
    coop = Setting("coop", 0.0, g.tau, g.steps, g.partition, 0.0, g.base_batch * g.ranks)
    return {"full": full, "coop": coop}


@register(order=30)
def experiment(g: Grid) -> Experiment:
    p, b = g.ranks, g.base_batch
    setup = (f"RI-SGD mu={g.full_mu:g} (every rank holds every chunk and draws {b} from each) against "
             f"Coop-SGD (every rank samples the whole set, {p * b} per step): {p * b} per rank both, "
             f"tau={g.tau}, {g.partition}.")
    return Experiment("diversity", TITLE, CLAIM, setup, g.seeds_other, tuple(settings_of(g).values()), analyse)


def analyse(ctx: Context, exp: Experiment) -> Analysis:
    g, d = ctx.grid, settings_of(ctx.grid)
    numbers = {"settings": {}}
    table = settings_table(ctx, exp, [("full_redundancy", d["full"]), ("coop", d["coop"])], numbers)
    checks = [V.paired(f"RI-SGD with full redundancy (mu={g.full_mu:g}) above cooperative SGD, final test accuracy "
                       f"(per-rank batch {d['coop'].base_batch} both)", ctx.values(d["full"], exp.seeds, final_acc),
                       ctx.values(d["coop"], exp.seeds, final_acc), V.ACC_MARGIN, detail="points per seed",
                       on=(d["full"], d["coop"]))]
    plot = curves(ctx, "fig3_diversity.png", f"Fig. 3 here: full redundancy vs cooperative SGD, tau={g.tau}",
                  [(f"RI-SGD full redundancy (mu={g.full_mu:g})", d["full"], exp.seeds),
                   ("Coop-SGD (every rank samples the whole set)", d["coop"], exp.seeds)], compare.X_AXES[::2])
    acc = numbers["settings"]
    head = (f"final acc: full redundancy {acc['full_redundancy']['final_test_acc']['mean']:.2f}, "
            f"Coop-SGD {acc['coop']['final_test_acc']['mean']:.2f}")
    return Analysis(exp, checks, numbers, table, plot, headline=head)
