"""The verdict rules of the paper report, fixed before any run was looked at (pure functions).

Every claim of the paper is split into *checks*. A check compares two settings seed by seed: for
each seed, ``diff`` is the measured advantage of the setting the paper says is better (oriented so
that a positive number supports the claim), and ``margin`` is the smallest advantage that counts
as an effect rather than noise. Then

    mean(diff) > margin  and  every seed's diff > 0    -> confirmed
    mean(diff) > margin  but  some seed's diff <= 0    -> mixed       (an effect, not on every seed)
    mean(diff) <= margin but  every seed's diff > 0    -> mixed       (consistent, but too small)
    mean(diff) <= margin and  some seed's diff <= 0    -> not confirmed

A check on a whole curve (a knee, an ordering of seed means) is a yes/no: confirmed or not
confirmed. An experiment is confirmed when all its checks are, not confirmed when none is, and
mixed otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

CONFIRMED, NOT_CONFIRMED, MIXED = "confirmed", "not confirmed", "mixed"
VERDICTS = (CONFIRMED, NOT_CONFIRMED, MIXED)

ACC_MARGIN = 0.5         # test-accuracy points: an advantage below this is not an effect
TARGET_GAP = 1.0         # "close to SyncSGD": within this many points of its final accuracy
ROUNDS_MARGIN = 0.0      # rounds to the target: any saving counts (never reaching it: see fewer_rounds)
DIV_MARGIN = math.log10(1.1)  # divergence, compared as log10 ratios: at least 10% smaller
KNEE_GAP = 1.0           # the knee of the tau sweep: the largest tau within this of the best accuracy


@dataclass
class Check:
    """One comparison behind a claim, with the numbers it was decided on."""

    name: str
    verdict: str
    diffs: list[float] = field(default_factory=list)  # per seed, positive supports the claim
    mean: float | None = None
    margin: float | None = None
    detail: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "verdict": self.verdict, "per_seed": self.diffs, "mean": self.mean,
                "margin": self.margin, "detail": self.detail}


def judge(diffs: Sequence[float], margin: float) -> str:
    """The per-seed rule of the module docstring. ``diffs`` must not be empty."""
    if not diffs:
        raise ValueError("judge() needs at least one seed's difference")
    effect = statistics.fmean(diffs) > margin
    every = all(d > 0 for d in diffs)
    if effect and every:
        return CONFIRMED
    if effect or every:
        return MIXED
    return NOT_CONFIRMED


def paired(name: str, better: dict[int, float], worse: dict[int, float], margin: float, detail: str = "",
           lower_is_better: bool = False) -> Check:
    """Check that ``better`` beats ``worse`` (both keyed by seed) on the seeds both have."""
    seeds = sorted(set(better) & set(worse))
    if not seeds:
        raise ValueError(f"check {name!r}: the two settings share no finished seed")
    sign = -1.0 if lower_is_better else 1.0
    diffs = [sign * (better[s] - worse[s]) for s in seeds]
    return Check(name, judge(diffs, margin), diffs, statistics.fmean(diffs), margin, detail)


def fewer_rounds(name: str, better: dict[int, tuple[float, bool]], worse: dict[int, tuple[float, bool]],
                 margin: float = ROUNDS_MARGIN, detail: str = "") -> Check:
    """Check that ``better`` reaches a target in fewer rounds than ``worse``; values are (rounds, reached)
    by seed, rounds from :func:`rounds_to`. A baseline that never reaches the target counts as its total
    rounds + 1 (a lower bound, which favours the baseline); a seed on which the claimed setting never
    reaches it cannot support the claim: its saving counts as at most 0."""
    seeds = sorted(set(better) & set(worse))
    if not seeds:
        raise ValueError(f"check {name!r}: the two settings share no finished seed")
    diffs = []
    for s in seeds:
        (rb, reached), (rw, _) = better[s], worse[s]
        diffs.append(rw - rb if reached else min(rw - rb, 0.0))
    return Check(name, judge(diffs, margin), diffs, statistics.fmean(diffs), margin, detail)


def boolean(name: str, holds: bool, detail: str = "") -> Check:
    return Check(name, CONFIRMED if holds else NOT_CONFIRMED, detail=detail)


def combine(verdicts: Sequence[str]) -> str:
    """All confirmed -> confirmed; none confirmed -> not confirmed; otherwise mixed."""
    if not verdicts:
        raise ValueError("combine() needs at least one verdict")
    if all(v == CONFIRMED for v in verdicts):
        return CONFIRMED
    if all(v == NOT_CONFIRMED for v in verdicts):
        return NOT_CONFIRMED
    return MIXED


def rounds_to(points: Sequence[tuple[float, float]], target: float, total_rounds: float) -> float:
    """Communication rounds at the first evaluation with accuracy >= ``target``.

    ``points`` are (rounds, accuracy) in run order. A run that never gets there counts as
    ``total_rounds + 1``: a lower bound of what it would need (see :func:`fewer_rounds` for how a
    check uses it).
    """
    for rounds, acc in points:
        if acc is not None and acc >= target:
            return float(rounds)
    return float(total_rounds) + 1.0


def knee(mean_acc_by_tau: dict[int, float], gap: float = KNEE_GAP) -> int:
    """The largest tau whose (seed-mean) accuracy is within ``gap`` points of the best tau's."""
    best = max(mean_acc_by_tau.values())
    return max(t for t, acc in mean_acc_by_tau.items() if acc >= best - gap)

