"""Seeds where they decide something: which runs the sequential rule of :mod:`tools.paper.verdict` adds.

After the grid's seeds are trained, every measured check that is inconclusive below the cap
(``Check.extendable``) may get its settings trained at the next look's seeds (``verdict.LOOKS``: 3 -> 5 ->
8). A check is taken only where the power estimate says the cap could decide it (``Check.needed`` <=
``verdict.SEED_CAP``); the others are reported with that estimate and cost nothing. The checks taken are
the cheapest first (the fewest new runs, runs shared between checks counted once) while the runs added
stay within a budget of runs, so a command run again, or ``--report-only``, makes the same choices from
the same finished runs. Which checks go on depends on their data; the rule's error bound does not (see
the verdict module: the union bound over the looks holds for any continuation rule).

Pure functions of the grid and its analyses; the paper command trains what :func:`more_seeds` returns
and calls it again until it returns nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import verdict as V
from .analysis import Analysis
from .grid import Grid, Setting


@dataclass(frozen=True)
class Step:
    """One check taken to its next look: the runs that takes (not yet in the grid)."""

    check: str
    seeds: int                                  # seeds now
    look: int                                   # the look it goes to
    needed: int                                 # the power estimate
    runs: tuple[tuple[Setting, int], ...]


def seed_sequence(grid: Grid, count: int) -> tuple[int, ...]:
    """The first ``count`` seeds: the grid's own, then the next integers after its largest."""
    base = sorted(set(grid.seeds_main) | set(grid.seeds_other))
    out = list(base[:count])
    nxt = max(base) + 1
    while len(out) < count:
        out.append(nxt)
        nxt += 1
    return tuple(out)


def candidates(grid: Grid, analyses: list[Analysis]) -> tuple[list[Step], list[V.Check]]:
    """The checks the cap could decide, each with the runs that take it to its next look; and the
    inconclusive measured checks the power estimate says the cap would not decide (reported only)."""
    planned = set(grid.runs())
    steps, hopeless, seen = [], [], set()
    for a in analyses:
        for c in a.checks:
            if not c.extendable or c.name in seen:
                continue
            seen.add(c.name)
            if c.needed is None or c.needed > V.SEED_CAP:
                hopeless.append(c)
                continue
            look = V.next_look(len(c.diffs))
            want = seed_sequence(grid, look)
            runs = tuple((s, seed) for s in c.settings for seed in want if (s, seed) not in planned)
            if runs:
                steps.append(Step(c.name, len(c.diffs), look, c.needed, runs))
    return steps, hopeless


def more_seeds(grid: Grid, analyses: list[Analysis], budget: int) -> tuple[list[Step], list[tuple[Setting, int]]]:
    """The checks taken to their next look within ``budget`` new runs (cheapest first, then by name), and
    their new runs in order (each once)."""
    steps, _ = candidates(grid, analyses)
    taken, runs = [], []
    for step in sorted(steps, key=lambda st: (len(st.runs), st.check)):
        new = [r for r in step.runs if r not in runs]
        if len(runs) + len(new) > budget:
            continue
        taken.append(step)
        runs += new
    return taken, runs
