"""Scenarios of the outer optimizer and compressed rounds, run inside each rank of a real 4-rank
gloo group (see tests/test_outer_compress.py)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from risgd_ext.flat import SLOT
from tests.engine_workers import build, ds_config, scenario_resume, state, train_step
from tests.hier_workers import snapshot_rounds


def _params_of(flats_snapshot: list[torch.Tensor], ctl) -> torch.Tensor:
    f = ctl.model.flats[0]
    return flats_snapshot[0][: f.num_param_elems]


def _buffers_of(flats_snapshot: list[torch.Tensor], ctl) -> torch.Tensor:
    f = ctl.model.flats[0]
    return flats_snapshot[0][f.num_param_elems: f.buffer.numel() - SLOT]  # BatchNorm's floats (the slot last)


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
            "buffers_before": [_buffers_of(b, ctl) for b in seen["before"]],
            "buffers_after": [_buffers_of(a, ctl) for a in seen["after"]],
            "live": ctl.stats()["live_ranks"], "stats": ctl.stats()}


OUTER = {"outer_lr": 0.7, "outer_momentum": 0.9, "outer_nesterov": True}
SCENARIOS = {
    "outer_flat": {"tau": 2, **OUTER},
    "outer_flat_failure": {"tau": 2, **OUTER, "failures": [{"ranks": [1], "start_round": 1, "end_round": 2}]},
    "outer_node": {"tau": 2, "node_size": 2, **OUTER},
    "plain": {"tau": 2},
    "int8": {"tau": 2, "compress": "int8"},
    "int8_node": {"tau": 2, "compress": "int8", "node_size": 2, "tau_intra": 1},
    "int4": {"tau": 2, "compress": "int4"},
    "bf16_no_ef": {"tau": 2, "compress": "bf16", "error_feedback": False},
}
RESUMES = {
    "outer_int8_overlap": {"tau": 4, "overlap": True, "compress": "int8", **OUTER},
    "int4_node_overlap": {"tau": 4, "overlap": True, "compress": "int4", "node_size": 2},
    "outer_bf16_node": {"tau": 4, "node_size": 2, "compress": "bf16", "outer_lr": 0.5, "outer_momentum": 0.5},
}


TWO_PHASE_CODECS = ("int8", "int4", "bf16", "int2", "topk", "topk0.1")


def scenario_two_phase(rank: int, world_size: int, rounds: int = 4) -> dict:
    """The compressed round itself, at N = 2, 3 and 4 ranks (subgroups of this group) and with each codec:
    a Linear(40, 30) (1,230 values) in buckets of 500 values (uneven buckets; chunks of ceil(500 / N)
    values, the last padded), each rank moving its parameters by its own noise every round. Returns, per
    (N, codec), each round's displacement and anchor change, and at the end both residuals."""
    from risgd_common.layout import Layout
    from risgd_ext.codec import CODECS
    from risgd_ext.round import Averaging, Live

    groups = {n: dist.new_group(list(range(n))) for n in (2, 3, 4) if n <= world_size}
    out = {}
    for n, group in groups.items():
        if rank >= n:
            continue
        for name in TWO_PHASE_CODECS:
            torch.manual_seed(0)
            lin = torch.nn.Linear(40, 30)
            avg = Averaging.build(list(lin.parameters()), [], 500 * 4, Layout(n), rank, group=group,
                                  codec=CODECS[name], error_feedback=True, measure_divergence=False)
            everyone = Live.without(frozenset(), n)
            g = torch.Generator().manual_seed(1000 + rank)
            f = avg.model.flats[0].num_param_elems
            sends, sums, moves = [], [], []
            for _ in range(rounds):
                with torch.no_grad():
                    for p in lin.parameters():
                        p.add_(torch.randn(p.shape, generator=g) * 10 ** torch.empty(p.shape).uniform_(-4, -1,
                                                                                                     generator=g))
                a = avg.model.anchors[0][:f].clone()
                sends.append((avg.model.flats[0].params[:f] - a).clone())
                r = avg.round(everyone)
                r.start(), r.wait()
                sums.append(r.sums[0][:f].clone())  # the round's sum, as every rank decoded it
                r.apply()
                moves.append((avg.model.anchors[0][:f] - a).clone())
            reducer = avg.reducer
            out[(n, name)] = {"sends": sends, "sums": sums, "moves": moves, "residual": reducer.residual[0][:f].clone(),
                              "server": {k: v.clone() for k, v in reducer.server_residual.items()},
                              "anchor": avg.model.anchors[0][:f].clone(), "bytes": reducer.round_bytes(
                                  avg.model.buffers)}
    return out


def run_all(rank: int, world_size: int, ckpt_dir: str) -> dict:
    out = {name: scenario_outer(rank, block) for name, block in SCENARIOS.items()}
    out["two_phase"] = scenario_two_phase(rank, world_size)
    for name, block in RESUMES.items():
        out["resume_" + name] = scenario_resume(rank, os.path.join(ckpt_dir, name), block, total=16)
    return out
