"""Which workers are down in a given averaging round (the paper's section 4.4).

The schedule is a pure function of the config and the round number, so every rank computes the
same answer without a collective. Entries name workers: ranks in a flat run, nodes with the node
level (``node_size`` > 1). A down worker's ranks keep running (this simulates the failure): they
contribute weight 0 to the average and take the averaged model, as a rejoining worker would.
"""

from __future__ import annotations

import random

from .config import RandomFailure, RISGDConfig, StaticFailure


def failed_workers(cfg: RISGDConfig, round_index: int, workers: int) -> frozenset[int]:
    """The set of workers (of ``workers``) that are down in averaging round ``round_index`` (0-based)."""
    down: set[int] = set()
    for i, failure in enumerate(cfg.failures):
        if isinstance(failure, StaticFailure):
            if failure.start_round <= round_index and (failure.end_round is None or round_index < failure.end_round):
                down.update(failure.ranks)
        elif isinstance(failure, RandomFailure) and round_index >= failure.start_round:
            # One generator per (entry, round): independent of how many rounds ran before, so a
            # resumed run draws the same failures as an uninterrupted one.
            rng = random.Random(f"{failure.seed}:{i}:{round_index}")
            if rng.random() < failure.prob:
                down.update(rng.sample(range(workers), failure.count))
    if len(down) >= workers:
        raise RuntimeError(
            f"round {round_index}: every worker is marked failed by the 'risgd.failures' schedule; "
            "at least one worker must stay live: shorten the overlapping failure ranges"
        )
    return frozenset(down)
