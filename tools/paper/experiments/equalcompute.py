"""Equal compute: RI-SGD with the batch split over its chunks against PR-SGD. Its settings, the paper's
claim and the analysis.

Under the ``per_chunk`` batch policy (Fig. 2's) a rank draws the base batch from each chunk it holds,
so RI-SGD computes more per step as mu grows. Under ``split`` a rank draws the base batch in all,
shared over its chunks: the same compute per step as PR-SGD. The verdict asks whether RI-SGD at each
RI-SGD mu of Fig. 2 still ends above PR-SGD (Fig. 2's run) at the same per-rank batch. The theory
experiment also uses these runs: the divergence against mu at an equal per-rank batch.
"""

from __future__ import annotations

from .. import verdict as V
from ..analysis import Analysis, Context, batch_text, by_seed, final_acc, fmt, md_table, setting_numbers
from ..grid import Experiment, Grid
from ..plots import xy_plot
from ..registry import register

TITLE = "Section 1: RI-SGD at equal compute (the batch split)"
CLAIM = ("Section 1: \"even when we reduce the minibatch size of RI-SGD inversely proportional to the amount of "
         "redundancy to make its computation burden equal to the no-redundancy counterpart, our experiments reveal "
         "that RI-SGD can still lead to increased accuracy due to greater diversity\" (than PR-SGD).")


def ri_mus(g: Grid) -> list[float]:
    return [mu for mu in sorted(g.mus) if mu > 0]


def settings_of(g: Grid) -> dict:
    """PR-SGD (key 0.0, Fig. 2's run) and RI-SGD with the base batch split over its chunks (key: mu)."""
    return {0.0: g.local(g.partition, 0.0),
            **{mu: g.local(g.partition, mu, batch_policy="split") for mu in ri_mus(g)}}


def per_chunk_of(g: Grid) -> dict:
    """Fig. 2's RI-SGD at the same mus (a base batch from each chunk), for reference."""
    return {mu: g.local(g.partition, mu) for mu in ri_mus(g)}


@register(order=80)
def experiment(g: Grid) -> Experiment:
    mus = ", ".join(f"{m:g}" for m in ri_mus(g))
    setup = (f"RI-SGD at mu in {{{mus}}} with data.batch_policy=split: each rank draws {g.base_batch} per step in all, "
             f"shared over its chunks, against PR-SGD at {g.base_batch} per rank (Fig. 2's run); tau={g.tau}, "
             f"{g.partition}. Fig. 2's RI-SGD runs ({g.base_batch} from each chunk) are shown for reference, "
             "not judged here.")
    return Experiment("equalcompute", TITLE, CLAIM, setup, g.seeds_other,
                      (*settings_of(g).values(), *per_chunk_of(g).values()), analyse)


def analyse(ctx: Context, exp: Experiment) -> Analysis:
    g = ctx.grid
    split, ref = settings_of(g), per_chunk_of(g)
    numbers, rows, checks = {"split": {}, "per_chunk": {}}, [], []
    prsgd = ctx.values(split[0.0], exp.seeds, final_acc)
    for mu, setting in split.items():
        nums = setting_numbers(ctx, setting, exp.seeds)
        numbers["split"][f"mu={mu:g}"] = nums
        rows.append([setting.label(), batch_text(setting, g.ranks), fmt(nums["final_test_acc"]),
                     fmt(nums["final_train_loss"], ".4f"), fmt(nums["divergence_mean"], ".2e"),
                     fmt(nums["wall_seconds"], ".1f")])
        if mu > 0:
            checks.append(V.paired(f"RI-SGD mu={mu:g} with the batch split ({g.base_batch} per rank) above PR-SGD at "
                                   f"the same {g.base_batch} per rank, final test accuracy",
                                   ctx.values(setting, exp.seeds, final_acc), prsgd, V.ACC_MARGIN,
                                   detail="points per seed", on=(setting, split[0.0])))
    for mu, setting in ref.items():
        nums = setting_numbers(ctx, setting, exp.seeds)
        numbers["per_chunk"][f"mu={mu:g}"] = nums
        rows.append([setting.label() + " (reference)", batch_text(setting, g.ranks), fmt(nums["final_test_acc"]),
                     fmt(nums["final_train_loss"], ".4f"), fmt(nums["divergence_mean"], ".2e"),
                     fmt(nums["wall_seconds"], ".1f")])
    table = md_table(["setting", "batch", "final test acc", "final train loss", "mean divergence", "wall s"], rows)
    mus = [0.0, *ri_mus(g)]
    lines_for = {"split (equal compute)": [split[mu] for mu in mus],
                 "per chunk (Fig. 2)": [split[0.0], *(ref[mu] for mu in mus[1:])]}
    panels = []
    for ylabel, fn, ylog in (("final test accuracy (%)", final_acc, False),
                             ("mean divergence before averaging",
                              lambda r: max(r["summary"]["divergence_mean"] or 0.0, 1e-12), True)):
        lines = [(name, mus, by_seed(ctx, ss, exp.seeds, fn)) for name, ss in lines_for.items()]
        panels.append({"xlabel": "mu (redundancy; 0 = PR-SGD)", "ylabel": ylabel, "ylog": ylog, "lines": lines})
    plot = xy_plot(ctx, "equal_compute.png", f"Equal compute: the batch split over the chunks ({g.partition}, "
                   f"tau={g.tau})", panels)
    acc = {k: v["final_test_acc"]["mean"] for k, v in numbers["split"].items()}
    head = (f"final acc at {g.base_batch} per rank: PR-SGD {acc['mu=0']:.2f}, "
            + ", ".join(f"RI-SGD split mu={mu:g} {acc[f'mu={mu:g}']:.2f}" for mu in ri_mus(g)))
    notes = ["Equal compute is equal samples per rank per step; the split policy also changes how the samples "
             "are spread over the chunks (fewer from each), which is what the claim attributes the gain to."]
    return Analysis(exp, checks, numbers, table, plot, notes, head)
