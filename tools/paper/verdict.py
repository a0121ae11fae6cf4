"""The verdict rules of the paper report (pure functions). This file is the rule: the report states its
sha256, so a reader can tell whether the rules that decided a report are the ones in a given commit.

Every claim of the paper is split into *checks*. Most checks are *measured*: for each seed, ``diff``
is the measured advantage of the setting the paper says is better (oriented so that a positive number
supports the claim; for a paired check, the difference between two settings trained with the same
seed), and ``margin`` is the smallest advantage that counts as an effect. With n >= MIN_SEEDS seeds
the 95% t interval of the mean, ``mean +- t(0.975, n - 1) * sd / sqrt(n)``, decides:

    the interval lies above the margin (low > margin)           -> confirmed
    the interval lies at or below the margin (high <= margin)   -> not confirmed
    the interval spans the margin                               -> inconclusive
    fewer than MIN_SEEDS seeds                                  -> inconclusive (the interval is still
                                                                   reported from 2 seeds)

A check of something discrete per seed (where the knee of a tau sweep lies) is a *vote*: confirmed
when it holds on every seed, not confirmed when it holds on none, inconclusive otherwise or with
fewer than MIN_SEEDS seeds.

An experiment is confirmed when all its checks are, not confirmed when all its checks are not,
mixed when some but not all are confirmed, and inconclusive when none is confirmed and some are
inconclusive.

Times are predictions of the cost model (``risgd_ext.cost_model``) at a stated network, BANDWIDTH_GBIT
and LATENCY_US: the run's measured compute per step times the steps, plus the ring all-reduces of the
bytes it moved. They are labelled as such wherever they appear.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

CONFIRMED, NOT_CONFIRMED, MIXED, INCONCLUSIVE = "confirmed", "not confirmed", "mixed", "inconclusive"
VERDICTS = (CONFIRMED, NOT_CONFIRMED, MIXED, INCONCLUSIVE)
CHECK_VERDICTS = (CONFIRMED, NOT_CONFIRMED, INCONCLUSIVE)  # a check is never mixed

MIN_SEEDS = 3            # a verdict needs a t interval over at least this many seeds
ACC_MARGIN = 0.5         # test-accuracy points: an advantage below this is not an effect
TARGET_GAP = 1.0         # "almost the same accuracy level": within this many points of SyncSGD's final accuracy
ROUNDS_MARGIN = 0.0      # rounds to the target: any saving counts (never reaching it: see reach_check)
DIV_MARGIN = math.log10(1.1)   # divergence, compared as log10 ratios: at least 10% smaller
LOSS_MARGIN = math.log10(1.1)  # training loss, compared as log10 ratios: at least 10% lower
WAY_SOONER = math.log10(2.0)   # "way sooner": at least 2x less (predicted) time, as a log10 ratio
SOONER = math.log10(1.1)       # "sooner" / "a better convergence rate": at least 10% less time
KNEE_GAP = 1.0           # the knee of a tau sweep: the largest tau within this of the best accuracy
KNEE_FACTOR = 1.5        # "tau around T": a knee within a factor 1.5 of T (with the grids' taus: T itself)
BANDWIDTH_GBIT = 1.0     # the network every predicted time is for (Gbit/s), a commodity Ethernet link
LATENCY_US = 50.0        # its per-message latency (microseconds; the recipes' default network.latency_us)

# t(0.975, df) for df = 1..30 (a table: no scipy at run time); beyond 30 a Cornish-Fisher expansion
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"t975 needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval(diffs: Sequence[float]) -> tuple[float, float] | None:
    """The 95% t interval of the mean of ``diffs``; None for fewer than 2 values."""
    if len(diffs) < 2:
        return None
    mean = statistics.fmean(diffs)
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean - half, mean + half


@dataclass
class Check:
    """One comparison behind a claim, with the numbers it was decided on."""

    name: str
    verdict: str
    diffs: list[float] = field(default_factory=list)  # per seed, positive supports the claim
    mean: float | None = None
    margin: float | None = None
    detail: str = ""
    low: float | None = None                          # the 95% interval of the mean (2 seeds or more)
    high: float | None = None
    votes: dict[int, bool] | None = None              # a vote: whether it holds, per seed

    def as_dict(self) -> dict:
        return {"name": self.name, "verdict": self.verdict, "per_seed": self.diffs, "mean": self.mean,
                "ci95": None if self.low is None else [self.low, self.high], "margin": self.margin,
                "seeds": len(self.votes) if self.votes is not None else len(self.diffs),
                "votes": None if self.votes is None else {str(k): v for k, v in self.votes.items()},
                "detail": self.detail}


def judge(diffs: Sequence[float], margin: float) -> str:
    """The interval rule of the module docstring. ``diffs`` must not be empty."""
    if not diffs:
        raise ValueError("judge() needs at least one seed's difference")
    if len(diffs) < MIN_SEEDS:
        return INCONCLUSIVE
    low, high = interval(diffs)
    if low > margin:
        return CONFIRMED
    if high <= margin:
        return NOT_CONFIRMED
    return INCONCLUSIVE


def measured(name: str, diffs: Mapping[int, float], margin: float, detail: str = "") -> Check:
    """A check of one per-seed advantage (by seed) against ``margin``."""
    if not diffs:
        raise ValueError(f"check {name!r}: no finished seed")
    values = [float(diffs[s]) for s in sorted(diffs)]
    ci = interval(values)
    return Check(name, judge(values, margin), values, statistics.fmean(values), margin, detail,
                 *(ci if ci else (None, None)))


def paired(name: str, better: Mapping[int, float], worse: Mapping[int, float], margin: float, detail: str = "",
           lower_is_better: bool = False) -> Check:
    """Check that ``better`` beats ``worse`` (both keyed by seed) on the seeds both have."""
    seeds = sorted(set(better) & set(worse))
    if not seeds:
        raise ValueError(f"check {name!r}: the two settings share no finished seed")
    sign = -1.0 if lower_is_better else 1.0
    return measured(name, {s: sign * (better[s] - worse[s]) for s in seeds}, margin, detail)


def reach_check(name: str, better: Mapping[int, tuple[float, bool]], worse: Mapping[int, tuple[float, bool]],
                margin: float, detail: str = "", ratio: bool = False) -> Check:
    """Check that ``better`` reaches a target with less of something (rounds, seconds) than ``worse``;
    values are (amount, reached) by seed. The saving per seed is ``worse - better`` or, with ``ratio``,
    ``log10(worse / better)``. A baseline that never reaches the target counts with its whole run's
    amount (a lower bound, which favours the baseline); a seed on which the claimed setting never
    reaches it cannot support the claim: its saving counts as at most 0."""
    seeds = sorted(set(better) & set(worse))
    if not seeds:
        raise ValueError(f"check {name!r}: the two settings share no finished seed")
    diffs = {}
    for s in seeds:
        (b, reached), (w, _) = better[s], worse[s]
        saving = math.log10(max(w, 1e-12) / max(b, 1e-12)) if ratio else w - b
        diffs[s] = saving if reached else min(saving, 0.0)
    return measured(name, diffs, margin, detail)


def fewer_rounds(name: str, better: Mapping[int, tuple[float, bool]], worse: Mapping[int, tuple[float, bool]],
                 margin: float = ROUNDS_MARGIN, detail: str = "") -> Check:
    """:func:`reach_check` on rounds (from :func:`rounds_to`): the rounds saved per seed."""
    return reach_check(name, better, worse, margin, detail)


def sooner(name: str, better: Mapping[int, tuple[float, bool]], worse: Mapping[int, tuple[float, bool]],
           margin: float, detail: str = "") -> Check:
    """:func:`reach_check` on seconds, as log10(worse / better) per seed (``margin`` a log10 ratio)."""
    return reach_check(name, better, worse, margin, detail, ratio=True)


def vote_verdict(votes: Mapping[int, bool]) -> str:
    """Every seed -> confirmed, none -> not confirmed, otherwise (or fewer than MIN_SEEDS) inconclusive."""
    if not votes:
        raise ValueError("vote_verdict() needs at least one seed")
    if len(votes) < MIN_SEEDS:
        return INCONCLUSIVE
    if all(votes.values()):
        return CONFIRMED
    if not any(votes.values()):
        return NOT_CONFIRMED
    return INCONCLUSIVE


def vote(name: str, votes: Mapping[int, bool], detail: str = "") -> Check:
    """A check that holds or not on each seed (by seed)."""
    votes = {int(k): bool(votes[k]) for k in sorted(votes)}
    return Check(name, vote_verdict(votes), detail=detail, votes=votes)


def combine(verdicts: Sequence[str]) -> str:
    """All confirmed -> confirmed; all not confirmed -> not confirmed; some confirmed -> mixed; none
    confirmed and some inconclusive -> inconclusive."""
    if not verdicts:
        raise ValueError("combine() needs at least one verdict")
    if all(v == CONFIRMED for v in verdicts):
        return CONFIRMED
    if all(v == NOT_CONFIRMED for v in verdicts):
        return NOT_CONFIRMED
    if any(v == CONFIRMED for v in verdicts):
        return MIXED
    return INCONCLUSIVE


def first_reach(points: Sequence[tuple[float, float]], target: float, total: float) -> tuple[float, bool]:
    """(x, True) at the first point (x, accuracy) with accuracy >= ``target``, in run order, else
    (``total``, False): the whole run's x."""
    for x, acc in points:
        if acc is not None and acc >= target:
            return float(x), True
    return float(total), False


def rounds_to(points: Sequence[tuple[float, float]], target: float, total_rounds: float) -> float:
    """Communication rounds at the first evaluation with accuracy >= ``target``.

    ``points`` are (rounds, accuracy) in run order. A run that never gets there counts as
    ``total_rounds + 1``: a lower bound of what it would need (see :func:`reach_check` for how a
    check uses it).
    """
    return first_reach(points, target, total_rounds + 1.0)[0]


def knee(acc_by_tau: Mapping[int, float], gap: float = KNEE_GAP) -> int:
    """The largest tau whose accuracy is within ``gap`` points of the best tau's."""
    best = max(acc_by_tau.values())
    return max(t for t, acc in acc_by_tau.items() if acc >= best - gap)


def near(value: float, centre: float, factor: float = KNEE_FACTOR) -> bool:
    """``value`` within a factor ``factor`` of ``centre`` (both > 0)."""
    return centre / factor <= value <= centre * factor


def fitted_fall(acc_by_tau: Mapping[int, float]) -> float:
    """How much the least-squares line of accuracy against log10(tau), over every tau given, falls
    from the smallest tau to the largest (points; positive: accuracy falls as tau grows)."""
    taus = sorted(acc_by_tau)
    if len(taus) < 2:
        raise ValueError("fitted_fall() needs at least two taus")
    xs = [math.log10(t) for t in taus]
    ys = [acc_by_tau[t] for t in taus]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return -slope * (xs[-1] - xs[0])
