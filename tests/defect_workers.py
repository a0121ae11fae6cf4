"""Scenarios of the composition issue's defects that need a real gloo group (tests/test_defects.py)."""

from __future__ import annotations

import os

import torch

from risgd_ext.engine import load_rank_state, save_rank_state
from tests.engine_workers import build, ds_config, train_step


def scenario_node_level_worker_state(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """An elastic run's node-level worker (2 ranks): each rank saves its state, and each gets its own back
    (its error-feedback residual above all: the ranks' residuals cover different slices)."""
    block = {"tau": 2, "node_size": 2, "compress": "int8"}
    engine = build(ds_config(block))
    engine.risgd.identity = rank // 2  # the manifest worker this node serves (go_live sets it)
    for step in range(4):
        train_step(engine, rank, step)
    mine = [r.clone() for r in engine.risgd.averaging.reducer.residual]
    save_rank_state(engine, ckpt_dir)
    torch.distributed.barrier()
    # Load into the same engine with its residuals wiped (a second engine would build a second set of gloo
    # groups; on a loaded 2-core machine that rendezvous has been reset by a peer: a flake, not this defect).
    reducer = engine.risgd.averaging.reducer
    reducer.residual = [torch.zeros_like(r) for r in mine]
    load_rank_state(engine, ckpt_dir)
    loaded = reducer.residual
    return {"files": sorted(os.listdir(ckpt_dir)), "own_back": loaded is not None and
            all(torch.equal(a, b) for a, b in zip(mine, loaded)), "nonzero": bool(any(r.any() for r in mine))}


def scenario_no_finite_contribution(rank: int, world_size: int) -> str:
    """Every rank's model NaN before a round: the round has no finite contribution; each rank raises it,
    naming the step."""
    from risgd_ext.round import NoFiniteContribution

    engine = build(ds_config({"tau": 2}))
    train_step(engine, rank, 0)
    with torch.no_grad():
        next(engine.module.parameters()).fill_(float("nan"))
    try:
        train_step(engine, rank, 1)
    except NoFiniteContribution as e:
        return str(e)
    return "no error"
