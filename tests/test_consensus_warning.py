"""A forgotten consensus() is not silent: the engine warns once, on every rank, when it is destroyed
or the process group is, while the ranks hold different models (real 2-rank gloo group)."""

from __future__ import annotations

import warnings

import torch.distributed as dist

from risgd_hosts.local import run_ranks
from tests.engine_workers import build, ds_config, train_step


def _caught(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if "risgd_ext" in str(w.message)]


def _scenarios(rank: int, world: int) -> dict:
    out = {}
    in_flight = build(ds_config({"tau": 2, "overlap": True}))
    for s in range(2):
        train_step(in_flight, rank, s)
    out["in_flight"] = _caught(in_flight.destroy)
    mid_round = build(ds_config({"tau": 4}))
    for s in range(3):
        train_step(mid_round, rank, s)
    out["mid_round"] = _caught(mid_round.destroy)
    out["again"] = _caught(mid_round.destroy)  # once
    done = build(ds_config({"tau": 2, "overlap": True}))
    for s in range(2):
        train_step(done, rank, s)
    done.risgd.consensus()
    out["after_consensus"] = _caught(done.destroy)
    left = build(ds_config({"tau": 2, "overlap": True}))
    for s in range(2):
        train_step(left, rank, s)
    out["process_group"] = _caught(dist.destroy_process_group)
    return out


def test_forgotten_consensus_warns_once_on_every_rank():
    for out in run_ranks(_scenarios, 2, timeout=300):
        assert len(out["in_flight"]) == 1
        assert "the engine is destroyed while a round is in flight" in out["in_flight"][0]
        assert "consensus()" in out["in_flight"][0]
        assert len(out["mid_round"]) == 1 and "step 3 is inside a round" in out["mid_round"][0]
        assert out["again"] == [] and out["after_consensus"] == []
        assert len(out["process_group"]) == 1 and "the process group is destroyed" in out["process_group"][0]
