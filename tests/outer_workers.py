"""Scenarios of the outer optimizer and compressed rounds, run inside each rank of a real 4-rank
gloo group (see tests/test_outer_compress.py)."""

from __future__ import annotations

import os

import torch

from tests.engine_workers import build, ds_config, scenario_resume, state, train_step
from tests.hier_workers import snapshot_rounds


def _params_of(flats_snapshot: list[torch.Tensor], ctl) -> torch.Tensor:
    f = ctl.model.flats[0]
    return flats_snapshot[0][: f.num_param_elems]


def scenario_outer(rank: int, block: dict, rounds: int = 3) -> dict:
    """Each round's models before (every rank's x_j) and after (the new anchor), for a float64
    reference of the outer step built in the test."""
    tau = block["tau"]
    engine = build(ds_config(block, momentum=0.9))
    ctl = engine.risgd
    first_anchor = ctl.model.anchors[0].clone()
    seen = snapshot_rounds(ctl)
    for s in range(tau * rounds):
        train_step(engine, rank, s)
    ctl.consensus()
    return {"anchor0": first_anchor, "before": [_params_of(b, ctl) for b in seen["before"]],
            "after": [_params_of(a, ctl) for a in seen["after"]], "final": state(engine),
            "live": ctl.stats()["live_ranks"], "stats": ctl.stats()}


OUTER = {"outer_lr": 0.7, "outer_momentum": 0.9, "outer_nesterov": True}
SCENARIOS = {
    "outer_flat": {"tau": 2, **OUTER},
    "outer_flat_failure": {"tau": 2, **OUTER, "failures": [{"ranks": [1], "start_round": 1, "end_round": 2}]},
    "outer_node": {"tau": 2, "node_size": 2, **OUTER},
    "plain": {"tau": 2},
    "int8": {"tau": 2, "compress": "int8"},
    "int8_node": {"tau": 2, "compress": "int8", "node_size": 2, "tau_intra": 1},
    "bf16_no_ef": {"tau": 2, "compress": "bf16", "error_feedback": False},
}
RESUMES = {
    "outer_int8_overlap": {"tau": 4, "overlap": True, "compress": "int8", **OUTER},
    "outer_bf16_node": {"tau": 4, "node_size": 2, "compress": "bf16", "outer_lr": 0.5, "outer_momentum": 0.5},
}


def run_all(rank: int, world_size: int, ckpt_dir: str) -> dict:
    out = {name: scenario_outer(rank, block) for name, block in SCENARIOS.items()}
    for name, block in RESUMES.items():
        out["resume_" + name] = scenario_resume(rank, os.path.join(ckpt_dir, name), block, total=16)
    return out
