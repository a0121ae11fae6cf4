"""Fig. 2: redundancy against SyncSGD. Its settings, the paper's claim and the analysis.

mu in the grid's mus at the main tau against SyncSGD, on every partition of the grid (the recipe's
first); the verdict asks whether the largest mu reaches SyncSGD's final accuracy minus 1 point in
fewer communication rounds than SyncSGD and than PR-SGD, and ends within that point of it.
"""

from __future__ import annotations

import statistics

from . import verdict as V
from .analysis import Analysis, Context, final_acc, fmt, md_table, points, setting_numbers, spread
from .grid import Experiment, Grid
from .plots import curves

TITLE = "Fig. 2: redundancy against SyncSGD"
CLAIM = ("Fig. 2 (ResNet on CIFAR-10/100, 4 workers, tau=50, mu in {0, 0.1, 0.25, 0.5}): \"by increasing redundancy "
         "rate we get quite close to the baseline SyncSGD in terms of convergence, in an accelerated rate ... We reach "
         "almost the same accuracy level way sooner\".")


def settings_of(g: Grid, partition: str) -> dict:
    """SyncSGD (key "sync") and PR-SGD / RI-SGD at each mu of the grid (key: mu), on ``partition``."""
    return {"sync": g.sync(partition), **{mu: g.local(partition, mu) for mu in g.mus}}


def experiment(g: Grid) -> Experiment:
    mus = ", ".join(f"{m:g}" for m in g.mus)
    setup = (f"mu in {{{mus}}} at tau={g.tau} (RI-SGD's mu_j ~ N(mu, {g.hetero_std:g})) against SyncSGD, "
             f"{g.steps} iterations, partitions {' and '.join(g.partitions)}; the target is SyncSGD's final "
             "accuracy (seed mean) minus 1 point.")
    settings = [s for part in g.partitions for s in settings_of(g, part).values()]
    return Experiment("fig2", TITLE, CLAIM, setup, g.seeds_main, tuple(settings), analyse)


def analyse(ctx: Context, exp: Experiment) -> Analysis:
    g = ctx.grid
    mu_max = max(g.mus)
    checks, numbers, rows, plots = [], {"target_gap": V.TARGET_GAP, "partitions": {}}, [], []
    for part in g.partitions:
        settings = settings_of(g, part)
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
