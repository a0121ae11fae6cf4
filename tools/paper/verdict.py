"""The verdict rules of the paper report (pure functions). This file is the rule: the report states its
sha256, so a reader can tell whether the rules that decided a report are the ones in a given commit.

Every claim of the paper is split into *checks*. Most checks are *measured*: for each seed, ``diff``
is the measured advantage of the setting the paper says is better (oriented so that a positive number
supports the claim; for a paired check, the difference between two settings trained with the same
seed), and ``margin`` is the smallest advantage that counts as an effect. With n >= MIN_SEEDS seeds
the t interval of the mean at the level of the *look* n belongs to, ``mean +- t(1 - a, n - 1) * sd / sqrt(n)``,
decides:

    the interval lies above the margin (low > margin)           -> confirmed
    the interval lies at or below the margin (high <= margin)   -> not confirmed
    the interval spans the margin                               -> inconclusive
    fewer than MIN_SEEDS seeds                                  -> inconclusive (the interval is still
                                                                   reported from 2 seeds)

**Seeds where they decide something (a sequential rule).** A check that is inconclusive at its seeds may
get more seeds for the settings it compares, up to SEED_CAP, at the looks LOOKS = (3, 5, 8): the paper
command trains seeds 3 and 4 and judges again at 5, then 5, 6 and 7 and judges at 8. Looking again at
data that were already judged inflates the chance of a false decision, so each look spends its own part
of the error: a false confirmation (or a false "not confirmed") at look k has probability at most
SPEND[k] = (0.025, 0.0125, 0.0125), one-sided; by the union bound (Bonferroni over the looks) the chance
of a false decision at any look is at most their sum, ALPHA = 0.05, whatever decided that a check goes
on (its observed spread, the time budget). The interval at a look is therefore the two-sided
1 - 2 * SPEND[k] interval: 95% at 3 seeds (the fixed-sample rule before this one, so a 3-seed verdict
is unchanged), 97.5% at 5 and 8. Why this rule: it is valid under any continuation rule, needs no
assumption about the spread between looks, and keeps the 3-seed look as it was; the price is an interval
at 5 and 8 seeds a little wider than a Pocock or O'Brien-Fleming boundary would give. A count of seeds
that is not a look (``--seeds`` given by hand) is judged at the level of the last look at or below it.

The power estimate: for a check the cap leaves undecided (or that the cap could not decide), the seeds
it would need, if its mean and spread stayed as observed, for the final look's interval to clear the
margin with 80% power (:func:`seeds_needed`). An estimate, stated as such.

A check of something discrete per seed (where the knee of a tau sweep lies) is a *vote*: confirmed
when it holds on every seed, not confirmed when it holds on none, inconclusive otherwise or with
fewer than MIN_SEEDS seeds.

An experiment is confirmed when all its checks are, not confirmed when all its checks are not,
mixed when some but not all are confirmed, and inconclusive when none is confirmed and some are
inconclusive.

Times are predictions of the cost model (``risgd_planner``) at a stated network, BANDWIDTH_GBIT
and LATENCY_US: the run's measured compute per step times the steps, plus the ring all-reduces of the
bytes it moved. They are labelled as such wherever they appear.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CONFIRMED, NOT_CONFIRMED, MIXED, INCONCLUSIVE = "confirmed", "not confirmed", "mixed", "inconclusive"
VERDICTS = (CONFIRMED, NOT_CONFIRMED, MIXED, INCONCLUSIVE)
CHECK_VERDICTS = (CONFIRMED, NOT_CONFIRMED, INCONCLUSIVE)  # a check is never mixed

MIN_SEEDS = 3            # a verdict needs a t interval over at least this many seeds
LOOKS = (3, 5, 8)        # the seed counts a check is judged at (the sequential rule above); the last is the cap
SEED_CAP = LOOKS[-1]
SPEND = (0.025, 0.0125, 0.0125)  # one-sided error spent at each look (each way); sums to ALPHA
ALPHA = 0.05             # the chance of a false confirmation (or refutation) over all looks, at most
POWER = 0.8              # the power the seed estimate of an undecided check is for
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

# The paper's own regime, where "way sooner" is a claim about (its Fig. 2, section 5): its model's bytes, its
# compute per step and its cluster's link. Each with its source, or the nearest stated assumption:
PAPER_PARAMS = 658_586          # ResNet-44 for CIFAR-10: counted from risgd_models' resnet44_cifar (He et al. 2016,
#                                 Table 6: 0.66M); fp32 on the wire, as the paper's TensorFlow averaging
PAPER_WORKERS = 4               # section 5.1: Fig. 2 on 4 GPUs, SyncSGD's batch 128, so 32 per worker per step
PAPER_STEP_FLOP = 3 * 2 * 97_174_144 * 32  # forward + backward (3x the forward) of resnet44_cifar's 97.2M
#                                 multiply-adds per 32x32 image (counted from its conv and linear layers), 32 images
PAPER_GPU_FLOPS = 15.7e12 * 0.4  # a Tesla V100 (section 5.1: V100 and GTX 1080 Ti): NVIDIA's 15.7 TFLOPS fp32 peak
#                                 (V100 SXM2 datasheet) at an ASSUMED 40% utilisation (the paper states no throughput)
PAPER_LINK_GBIT = 10.0          # ASSUMED: the paper names its GPUs, not its network; 10 Gbit/s Ethernet
PAPER_LATENCY_US = 50.0         # ASSUMED: the same per-message latency as BANDWIDTH_GBIT's network


def paper_ratio() -> float:
    """The paper's communication-to-compute ratio: one fp32 ring all-reduce of its model over its workers
    on its (assumed) link, over one worker's compute per step (2(N-1)/N * bytes / bandwidth + 2(N-1)
    latencies, the cost model's ring; see ``risgd_planner.ring_seconds``)."""
    n = PAPER_WORKERS
    comm = 2 * (n - 1) / n * 4 * PAPER_PARAMS / (PAPER_LINK_GBIT * 1e9 / 8) + 2 * (n - 1) * PAPER_LATENCY_US * 1e-6
    return comm / (PAPER_STEP_FLOP / PAPER_GPU_FLOPS)


def paper_link(model_bytes: float, compute_per_step: float, world: int) -> tuple[float, float]:
    """(bandwidth Gbit/s, latency us) of the link on which a run here has the paper's communication-to-compute
    ratio: one fp32 all-reduce of ``model_bytes`` over ``world`` ranks costs :func:`paper_ratio` times
    ``compute_per_step`` (SyncSGD's measured compute per step here), split between bandwidth and latency
    as on the paper's link. Times on it are predictions for the paper's regime, not measurements."""
    n = PAPER_WORKERS
    paper_comm_bw = 2 * (n - 1) / n * 4 * PAPER_PARAMS / (PAPER_LINK_GBIT * 1e9 / 8)
    paper_comm_lat = 2 * (n - 1) * PAPER_LATENCY_US * 1e-6
    scale = compute_per_step / (PAPER_STEP_FLOP / PAPER_GPU_FLOPS)  # seconds here per second there
    bandwidth = 2 * (world - 1) / world * model_bytes / (paper_comm_bw * scale) * 8 / 1e9
    latency = paper_comm_lat * scale / (2 * (world - 1)) * 1e6
    return bandwidth, latency


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


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (0 < p < 1), by bisection on
    :func:`t_cdf` (no scipy at run time)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def spend_at(n: int) -> float | None:
    """The one-sided error spent at the look of ``n`` seeds (the last look at or below n); None below
    the first look."""
    spent = [a for look, a in zip(LOOKS, SPEND) if look <= n]
    return spent[-1] if spent else None


def next_look(n: int) -> int | None:
    """The next look after ``n`` seeds, or None at or past the cap."""
    return next((look for look in LOOKS if look > n), None)


def interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The two-sided ``level`` t interval of the mean of ``diffs``; None for fewer than 2 values."""
    if len(diffs) < 2:
        return None
    mean = statistics.fmean(diffs)
    q = t975(len(diffs) - 1) if level == 0.95 else t_quantile(1.0 - (1.0 - level) / 2.0, len(diffs) - 1)
    half = q * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean - half, mean + half


def level_at(n: int) -> float:
    """The two-sided level of the interval that judges ``n`` seeds (95% below the first look, for display)."""
    a = spend_at(n)
    return 0.95 if a is None else 1.0 - 2.0 * a


def seeds_needed(diffs: Sequence[float], margin: float, power: float = POWER, limit: int = 200) -> int | None:
    """A power estimate: the fewest seeds (at least ``len(diffs)``) at which the final look's interval
    would clear ``margin`` with probability ``power`` if the mean and spread stayed as observed:
    |mean - margin| >= (t(1 - SPEND[-1], n - 1) + t(power, n - 1)) * sd / sqrt(n). None for fewer than 2
    values, a mean on the margin, or more than ``limit`` seeds."""
    if len(diffs) < 2:
        return None
    gap, sd = abs(statistics.fmean(diffs) - margin), statistics.stdev(diffs)
    if sd == 0.0:
        return len(diffs) if gap > 0 else None
    if gap == 0.0:
        return None
    for n in range(max(len(diffs), 2), limit + 1):
        if gap >= (t_quantile(1.0 - SPEND[-1], n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n):
            return n
    return None


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
    level: float = 0.95                               # the two-sided level of the interval (its look's)
    needed: int | None = None                         # the power estimate of the seeds a decision needs
    settings: tuple[Any, ...] = ()                    # the settings it compares (grid Settings): what more
                                                      # seeds are trained for (the sequential rule)
    seeds: tuple[int, ...] = ()                       # the seeds it was decided on

    @property
    def extendable(self) -> bool:
        """Inconclusive, measured, with settings to train more seeds of, and below the cap."""
        return (self.verdict == INCONCLUSIVE and self.votes is None and bool(self.settings)
                and len(self.diffs) >= MIN_SEEDS and next_look(len(self.diffs)) is not None)

    def as_dict(self) -> dict:
        return {"name": self.name, "verdict": self.verdict, "per_seed": self.diffs, "mean": self.mean,
                "ci95": None if self.low is None else [self.low, self.high], "margin": self.margin,
                "seeds": len(self.votes) if self.votes is not None else len(self.diffs),
                "seed_ids": list(self.seeds), "level": self.level, "seeds_needed": self.needed,
                "votes": None if self.votes is None else {str(k): v for k, v in self.votes.items()},
                "detail": self.detail}


def judge(diffs: Sequence[float], margin: float) -> str:
    """The interval rule of the module docstring, at the level of the look ``len(diffs)`` belongs to.
    ``diffs`` must not be empty."""
    if not diffs:
        raise ValueError("judge() needs at least one seed's difference")
    if len(diffs) < MIN_SEEDS:
        return INCONCLUSIVE
    low, high = interval(diffs, level_at(len(diffs)))
    if low > margin:
        return CONFIRMED
    if high <= margin:
        return NOT_CONFIRMED
    return INCONCLUSIVE


def measured(name: str, diffs: Mapping[int, float], margin: float, detail: str = "", on: Sequence = ()) -> Check:
    """A check of one per-seed advantage (by seed) against ``margin``; ``on``: the settings it compares
    (the ones more seeds are trained for while it is inconclusive)."""
    if not diffs:
        raise ValueError(f"check {name!r}: no finished seed")
    seeds = tuple(sorted(diffs))
    values = [float(diffs[s]) for s in seeds]
    level = level_at(len(values))
    ci = interval(values, level)
    verdict = judge(values, margin)
    needed = seeds_needed(values, margin) if verdict == INCONCLUSIVE else None
    return Check(name, verdict, values, statistics.fmean(values), margin, detail, *(ci if ci else (None, None)),
                 level=level, needed=needed, settings=tuple(dict.fromkeys(on)), seeds=seeds)


def paired(name: str, better: Mapping[int, float], worse: Mapping[int, float], margin: float, detail: str = "",
           lower_is_better: bool = False, on: Sequence = ()) -> Check:
    """Check that ``better`` beats ``worse`` (both keyed by seed) on the seeds both have."""
    seeds = sorted(set(better) & set(worse))
    if not seeds:
        raise ValueError(f"check {name!r}: the two settings share no finished seed")
    sign = -1.0 if lower_is_better else 1.0
    return measured(name, {s: sign * (better[s] - worse[s]) for s in seeds}, margin, detail, on)


def reach_check(name: str, better: Mapping[int, tuple[float, bool]], worse: Mapping[int, tuple[float, bool]],
                margin: float, detail: str = "", ratio: bool = False, on: Sequence = ()) -> Check:
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
    return measured(name, diffs, margin, detail, on)


def fewer_rounds(name: str, better: Mapping[int, tuple[float, bool]], worse: Mapping[int, tuple[float, bool]],
                 margin: float = ROUNDS_MARGIN, detail: str = "", on: Sequence = ()) -> Check:
    """:func:`reach_check` on rounds (from :func:`rounds_to`): the rounds saved per seed."""
    return reach_check(name, better, worse, margin, detail, on=on)


def sooner(name: str, better: Mapping[int, tuple[float, bool]], worse: Mapping[int, tuple[float, bool]],
           margin: float, detail: str = "", on: Sequence = ()) -> Check:
    """:func:`reach_check` on seconds, as log10(worse / better) per seed (``margin`` a log10 ratio)."""
    return reach_check(name, better, worse, margin, detail, ratio=True, on=on)


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
    return Check(name, vote_verdict(votes), detail=detail, votes=votes, seeds=tuple(votes))


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
