"""Which ranks are down in a given averaging round (the paper's section 4.4).

The schedule is a pure function of the config and the round number, so every rank computes the
same answer without a collective. A down rank keeps running (this simulates the failure): it
contributes weight 0 to the average and takes the averaged model, as a rejoining worker would.
"""

from __future__ import annotations

import random

from .config import RandomFailure, RISGDConfig, StaticFailure


def failed_ranks(cfg: RISGDConfig, round_index: int, world_size: int) -> frozenset[int]:
    """The set of ranks that are down in averaging round ``round_index`` (0-based)."""
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
                down.update(rng.sample(range(world_size), failure.count))
    if len(down) >= world_size:
        raise RuntimeError(
            f"round {round_index}: every rank is marked failed by the 'risgd.failures' schedule; "
            "at least one rank must stay live: shorten the overlapping failure ranges"
        )
    return frozenset(down)
