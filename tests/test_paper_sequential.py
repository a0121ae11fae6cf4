"""The paper report's sequential rule (seeds where they decide something), its power estimate, the paper's
own regime, and p = 8: on constructed numbers, each able to fail."""

from __future__ import annotations

import math
import os
import random
import statistics
from dataclasses import replace

import numpy as np
import pytest
from helpers import ROOT
from scipy import stats
from test_paper import constructed_runs

from risgd_planner import ring_seconds
from risgd_tools.paper import report as paper_report
from risgd_tools.paper import sequential
from risgd_tools.paper import verdict as V
from risgd_tools.paper.analysis import Context
from risgd_tools.paper.experiments import workers
from risgd_tools.paper.grid import make_grid
from risgd_trainer.run_config import load_recipe


def recipe() -> dict:
    return load_recipe(os.path.join(ROOT, "recipes/digits.yaml"))


def walk(diffs: list[float], margin: float, spend=V.SPEND, looks=V.LOOKS) -> tuple[str, int]:
    """The rule as the paper command applies it to one check: judge at each look, go on while inconclusive.
    ``spend``: the one-sided error per look (the rule's, or another to show what it guards against)."""
    for look, a in zip(looks, spend):
        values = diffs[:look]
        low, high = V.interval(values, 1.0 - 2.0 * a)
        if low > margin:
            return V.CONFIRMED, look
        if high <= margin:
            return V.NOT_CONFIRMED, look
    return V.INCONCLUSIVE, looks[-1]


def test_the_t_quantile_is_students():
    for df in (1, 2, 4, 7, 30, 200):
        for p in (0.6, 0.8, 0.975, 0.9875, 0.999):
            assert V.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)
        assert V.t_quantile(0.025, df) == pytest.approx(-V.t_quantile(0.975, df))
    assert all(V.t_quantile(0.975, df) == pytest.approx(V.t975(df), abs=1e-4) for df in range(1, 31))
    with pytest.raises(ValueError):
        V.t_quantile(1.0, 3)


def test_the_looks_spend_five_percent_and_keep_the_three_seed_rule():
    assert sum(V.SPEND) == pytest.approx(V.ALPHA) and V.LOOKS[-1] == V.SEED_CAP and len(V.LOOKS) == len(V.SPEND)
    assert V.level_at(3) == 0.95 and V.level_at(4) == 0.95 and V.level_at(5) == 0.975 and V.level_at(8) == 0.975
    assert V.next_look(3) == 5 and V.next_look(5) == 8 and V.next_look(8) is None
    # at 3 seeds the verdict is the fixed-sample 95% rule's; at 5 the wider 97.5% interval decides
    assert V.judge([2.0, 2.1, 1.9], 0.5) == V.CONFIRMED
    five = [1.0, 0.2, 1.3, 0.9, 1.1]  # mean 0.9, sd 0.41: 95% low 0.39, 97.5% low 0.29 -> inconclusive over 0.35
    assert V.interval(five)[0] > 0.35 > V.interval(five, 0.975)[0]
    assert V.judge(five, 0.35) == V.INCONCLUSIVE
    c = V.measured("x", dict(enumerate(five)), 0.35)
    assert c.level == 0.975 and c.as_dict()["level"] == 0.975 and c.as_dict()["seed_ids"] == [0, 1, 2, 3, 4]


def test_a_clear_effect_is_decided_with_few_seeds_and_a_null_one_stays_open_to_the_cap():
    rng = random.Random(1)
    clear = [2.0 + rng.gauss(0, 0.3) for _ in range(8)]
    assert walk(clear, 0.5) == (V.CONFIRMED, 3)
    assert walk([-x for x in clear], 0.5) == (V.NOT_CONFIRMED, 3)
    wide = [1.4, 0.1, 2.3, 1.5, 1.2, 0.9, 1.6, 1.3]  # an effect the first look cannot tell, the second can
    assert walk(wide, 0.5)[0] == V.CONFIRMED and walk(wide, 0.5)[1] > 3
    null = [0.5 + d for d in (1.0, -1.0, 0.3, -0.3, 0.8, -0.8, 0.1, -0.1)]  # centred on the margin
    assert walk(null, 0.5) == (V.INCONCLUSIVE, V.SEED_CAP)


def confirmed_by_walk(diffs: np.ndarray, spend) -> np.ndarray:
    """Which rows of ``diffs`` (a simulated null per row) :func:`walk` confirms: the same intervals,
    vectorised over the rows."""
    open_, confirmed = np.ones(len(diffs), bool), np.zeros(len(diffs), bool)
    for look, a in zip(V.LOOKS, spend):
        x = diffs[:, :look]
        half = V.t_quantile(1.0 - a, look - 1) * x.std(axis=1, ddof=1) / math.sqrt(look)
        low, high = x.mean(axis=1) - half, x.mean(axis=1) + half
        confirmed |= open_ & (low > 0.5)
        open_ &= ~((low > 0.5) | (high <= 0.5))
    return confirmed


def false_confirmations(spend, sims: int = 20000, seed: int = 7) -> float:
    """The share of simulated null checks (the true effect is the margin) that :func:`walk` confirms."""
    diffs = np.random.default_rng(seed).normal(0.5, 1.0, size=(sims, V.SEED_CAP))
    return float(confirmed_by_walk(diffs, spend).mean())


def test_false_confirmations_on_simulated_nulls_stay_at_or_below_five_percent():
    rng = random.Random(3)  # the vectorised count is walk()'s, check by check
    sample = [[0.5 + rng.gauss(0, 1.0) for _ in range(V.SEED_CAP)] for _ in range(300)]
    for spend in (V.SPEND, (0.05, 0.05, 0.05)):
        confirmed = confirmed_by_walk(np.array(sample), spend)
        assert list(confirmed) == [walk(d, 0.5, spend)[0] == V.CONFIRMED for d in sample]
    rate = false_confirmations(V.SPEND)
    se = math.sqrt(0.05 * 0.95 / 20000)
    assert rate <= V.ALPHA, rate
    assert rate > 0.025 + 3 * se  # it does spend the later looks: more than one 95% look alone would
    # the check can fail: the fixed-sample 95% interval repeated at every look (a rule that ignores the repeated
    # looks) confirms more than 5% of the nulls (6.0% here)
    assert false_confirmations((0.025, 0.025, 0.025)) > V.ALPHA + 3 * se


def test_the_power_estimate_against_a_hand_worked_case():
    diffs = [0.42, 1.11, 1.80]  # mean 1.11, sd 0.69, margin 0.5: the gap 0.61
    n = V.seeds_needed(diffs, 0.5)
    gap, sd = 0.61, statistics.stdev(diffs)
    for m in (n - 1, n):  # the smallest n where (t(1 - 0.0125, n-1) + t(0.8, n-1)) * sd / sqrt(n) <= gap
        ok = (stats.t.ppf(1 - V.SPEND[-1], m - 1) + stats.t.ppf(V.POWER, m - 1)) * sd / math.sqrt(m) <= gap
        assert ok == (m == n)
    assert V.seeds_needed([0.5, 0.5, 0.5], 0.5) is None        # on the margin: no number of seeds decides it
    assert V.seeds_needed([0.4, 0.6, 0.5], 0.5) is None         # a zero mean gap
    assert V.seeds_needed([1.0, 1.0, 1.0], 0.5) == 3            # no spread: decided already
    assert V.seeds_needed([9.0, -8.0, 1.0], 0.5) is None        # beyond 200 seeds


def test_the_paper_regime_against_a_hand_worked_case():
    # ResNet-44: 658,586 fp32 parameters over 4 workers on 10 Gbit/s with 50 us per message; 97.2M multiply-adds
    comm = 2 * 3 / 4 * 4 * 658_586 / 1.25e9 + 6 * 50e-6                  # 3.4612 ms
    compute = 3 * 2 * 97_174_144 * 32 / (15.7e12 * 0.4)                  # 2.9709 ms
    assert V.paper_ratio() == pytest.approx(comm / compute) and V.paper_ratio() == pytest.approx(1.1650, abs=1e-4)
    bw, lat = V.paper_link(300_000.0, 0.01, 4)  # digits' 75k parameters, 10 ms of compute per step here
    assert ring_seconds(300_000.0, 4, bw * 1e9 / 8, lat / 1e6, collectives=1) == pytest.approx(V.paper_ratio() * 0.01)
    scale = 0.01 / compute  # a second there is 3.366 s here: the bandwidth and latency terms scale alike
    assert bw == pytest.approx(2 * 3 / 4 * 300_000.0 * 8 / (2 * 3 / 4 * 4 * 658_586 / 1.25e9 * scale) / 1e9)
    assert lat == pytest.approx(50.0 * scale)


def test_the_sequential_rule_adds_seeds_for_the_check_it_can_decide(tmp_path):
    grid = make_grid("test", recipe(), ranks=2, seeds=(0, 1, 2))
    runs = constructed_runs(grid, holds=True)
    d = {k: s for k, s in zip(("full", "coop"), next(e for e in grid.experiments() if e.key == "diversity").settings)}
    acc = {0: 1.9, 1: 0.9, 2: 2.2, 3: 1.6, 4: 1.8}  # full redundancy minus coop per seed: unclear at 3 seeds

    def set_diversity(runs, seeds):
        for seed in seeds:
            base = runs[d["coop"].run_name(0)]["summary"]["final_test_acc"]
            for key, value in (("coop", base), ("full", base + acc[seed])):
                src = runs[d[key].run_name(0)]
                run = {**src, "summary": {**src["summary"], "final_test_acc": value, "seed": seed}}
                runs[d[key].run_name(seed)] = run

    set_diversity(runs, (0, 1, 2))
    analyses = paper_report.analyse(grid, runs, str(tmp_path), draw=False)
    check = next(a for a in analyses if a.exp.key == "diversity").checks[0]
    assert check.verdict == V.INCONCLUSIVE and check.extendable and check.needed <= V.SEED_CAP
    assert set(check.settings) == {d["full"], d["coop"]}
    steps, more = sequential.more_seeds(grid, analyses, budget=100)
    assert check.name in [st.check for st in steps]
    assert {(d["full"], 3), (d["full"], 4), (d["coop"], 3), (d["coop"], 4)} <= set(more)
    assert all(seed in (3, 4) for _, seed in more)  # the next look is 5 seeds
    # a budget smaller than a check's runs takes nothing of it; the cheapest first
    steps_small, more_small = sequential.more_seeds(grid, analyses, budget=3)
    assert check.name not in [st.check for st in steps_small] and len(more_small) <= 3
    # the runs trained: judged again at 5 seeds, with the 97.5% interval, and decided
    wider = replace(grid, extra=tuple(more))
    runs5 = constructed_runs(wider, holds=True)
    set_diversity(runs5, (0, 1, 2, 3, 4))
    after = next(a for a in paper_report.analyse(wider, runs5, str(tmp_path), draw=False) if a.exp.key == "diversity")
    assert after.checks[0].diffs == pytest.approx([acc[s] for s in range(5)])
    assert after.checks[0].level == 0.975 and after.checks[0].verdict == V.CONFIRMED
    # what the report says of it
    assert paper_report.seed_note(after.checks[0]) == "5"
    assert "not extended" in paper_report.seed_note(replace(check, needed=40))


def test_a_check_the_cap_cannot_decide_costs_nothing(tmp_path):
    grid = make_grid("test", recipe(), ranks=2, seeds=(0, 1, 2))
    analyses = paper_report.analyse(grid, constructed_runs(grid, holds=True, noisy_diversity=True), str(tmp_path),
                                     draw=False)
    check = next(a for a in analyses if a.exp.key == "diversity").checks[0]  # +8, 0, -8 points
    assert check.verdict == V.INCONCLUSIVE and (check.needed is None or check.needed > V.SEED_CAP)
    steps, hopeless = sequential.candidates(grid, analyses)
    assert check.name in [c.name for c in hopeless] and check.name not in [st.check for st in steps]
    assert "beyond the cap" in paper_report.seed_note(check)


def test_p_8_trains_in_a_launch_of_its_own(tmp_path):
    grid = make_grid("full", recipe(), ranks=4)
    assert grid.wide_ranks == 8 and workers.workers_of(grid) == [2, 4, 8]
    assert make_grid("full", recipe(), ranks=4, max_ranks=4).wide_ranks == 0
    assert make_grid("test", recipe(), ranks=2).wide_ranks == 0
    s = workers.settings_of(grid)
    wide = s[(8, grid.tau_mu)]
    assert wide.ranks == 8 and wide.world(4) == 8 and wide.node_size == 1 and wide.run_name(0).endswith("-r8-s0")
    assert wide.per_rank_batch(4) == 32 * (1 + 2)  # mu=0.25 of 8 workers: two more chunks
    assert s[(4, grid.tau_mu)].ranks == 0 and s[(2, 0.0)].node_size == 2  # the grid's own launch, as before
    worlds = {setting.world(grid.ranks) for setting, _ in grid.runs()}
    assert worlds == {4, 8} and sum(st.world(4) == 8 for st, _ in grid.runs()) == 2 * len(grid.seeds_other)
    # the gain at p=8 against p=4 is judged, either way
    exp = next(e for e in grid.experiments() if e.key == "workers")
    quick = replace(grid, seeds_other=(0, 1, 2), seeds_main=(0, 1, 2))
    runs = {}
    for (p, mu), setting in s.items():
        for seed in (0, 1, 2):
            gain = {2: 0.5, 4: 1.5, 8: 3.5}[p] if mu else 0.0
            summary = {"final_test_acc": 90.0 + gain + 0.1 * seed, "divergence_mean": 1e-3, "wall_seconds": 1.0,
                       "world_size": setting.world(4), "seed": seed}
            runs[setting.run_name(seed)] = {"dir": "/x", "summary": summary, "metrics": []}
    checks = exp.analyse(Context(quick, runs, str(tmp_path), draw=False), exp).checks
    names = [c.name for c in checks]
    assert any("larger at p=8 than at p=4" in n for n in names) and any(n.startswith("p=8:") for n in names)
    growth = next(c for c in checks if "larger at p=8" in c.name)
    assert growth.diffs == pytest.approx([2.0] * 3) and growth.verdict == V.CONFIRMED
    for seed in (0, 1, 2):  # the same gain at 8 as at 4: not growing
        runs[s[(8, grid.tau_mu)].run_name(seed)]["summary"]["final_test_acc"] = 91.5 + 0.1 * seed
    checks = exp.analyse(Context(quick, runs, str(tmp_path), draw=False), exp).checks
    growth = next(c for c in checks if "larger at p=8" in c.name)
    assert growth.verdict == V.NOT_CONFIRMED
