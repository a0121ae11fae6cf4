"""Scenarios of the node level and of overlapped averaging, run inside each rank of a real 4-rank
gloo group seen as 2 nodes x 2 ranks (see tests/test_hierarchy.py)."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from tests.engine_workers import build, ds_config, observe_collectives, scenario_resume, state, train_step

NODE = 2  # ranks per node


@contextlib.contextmanager
def record_collectives():
    """Record every all_reduce / broadcast / all_gather / barrier with the global ranks of its group
    and its async_op flag (False: the call blocks until the collective is done)."""
    calls: list[tuple[str, tuple[int, ...], bool]] = []

    def record(name, args, kwargs):
        group = kwargs.get("group")
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(
            range(dist.get_world_size()))
        calls.append((name, ranks, bool(kwargs.get("async_op", False))))

    with observe_collectives(("all_reduce", "broadcast", "all_gather", "barrier"), record):
        yield calls


def level(ranks: tuple[int, ...]) -> str:
    return "node" if len({r // NODE for r in ranks}) == 1 else "cross"


def run_steps(engine, rank: int, steps: range, record: bool = True) -> tuple[list, list]:
    calls, states = [], []
    for s in steps:
        with record_collectives() as c:
            train_step(engine, rank, s)
        calls.append([(name, level(ranks), is_async) for name, ranks, is_async in c] if record else [])
        states.append(state(engine))
    return calls, states


def snapshot_rounds(ctl) -> dict:
    """Wrap the controller so each round's models before and after are kept."""
    seen: dict = {"before": [], "after": [], "applied_before": [], "applied_after": [], "sent_steps": []}
    average, apply = ctl.average, ctl._apply_pending

    def snap() -> list[torch.Tensor]:
        return [f.buffer.detach().clone() for f in ctl.model.flats]

    def wrapped_average():
        seen["before"].append(snap())
        seen["sent_steps"].append(ctl.steps)
        average()
        seen["after"].append(snap())

    def wrapped_apply(scheduled: bool):
        seen["applied_before"].append(snap())
        apply(scheduled)
        seen["applied_after"].append(snap())

    ctl.average, ctl._apply_pending = wrapped_average, wrapped_apply
    return seen


def scenario_node_sync(rank: int, tau: int = 4, rounds: int = 3) -> dict:
    """tau_intra=0: gradients all-reduced inside the node every step, parameters across nodes every tau."""
    engine = build(ds_config({"tau": tau, "node_size": NODE}, momentum=0.9))
    seen = snapshot_rounds(engine.risgd)
    calls, states = run_steps(engine, rank, range(tau * rounds))
    return {"calls": calls, "states": states, "stats": engine.risgd.stats(), "rounds": seen,
            "lean": engine._risgd_lean}


def scenario_node_intra(rank: int, tau: int = 4, tau_intra: int = 2, rounds: int = 2) -> dict:
    """tau_intra=2: parameters averaged inside the node every 2 steps, across nodes every 4."""
    engine = build(ds_config({"tau": tau, "node_size": NODE, "tau_intra": tau_intra}, momentum=0.9))
    seen = snapshot_rounds(engine.risgd)
    calls, states = run_steps(engine, rank, range(tau * rounds))
    return {"calls": calls, "states": states, "stats": engine.risgd.stats(), "rounds": seen}


def scenario_node_failure(rank: int, tau: int = 2) -> dict:
    """Worker (node) 1 is down in round 1: its ranks contribute nothing and take node 0's model."""
    engine = build(ds_config({"tau": tau, "node_size": NODE,
                              "failures": [{"ranks": [1], "start_round": 1, "end_round": 2}]}))
    seen = snapshot_rounds(engine.risgd)
    _, states = run_steps(engine, rank, range(3 * tau), record=False)
    return {"rounds": seen, "states": states, "stats": engine.risgd.stats()}


def scenario_overlap_failure(rank: int, tau: int = 2) -> dict:
    """Overlap, flat: rank 1 is down in round 1; its zero contribution is left out of the average."""
    engine = build(ds_config({"tau": tau, "overlap": True,
                              "failures": [{"ranks": [1], "start_round": 1, "end_round": 2}]}))
    seen = snapshot_rounds(engine.risgd)
    run_steps(engine, rank, range(3 * tau), record=False)
    engine.risgd.consensus()
    return {"rounds": seen, "final": state(engine), "stats": engine.risgd.stats()}


def scenario_overlap(rank: int, node_size: int, tau: int = 4, delay: int = 0, rounds: int = 3) -> dict:
    """Overlapped rounds: collectives per step, each round's models around its send and its apply,
    and the model inside averaged() at each round; then consensus() at the end."""
    block = {"tau": tau, "overlap": True, "node_size": node_size}
    if delay:
        block["overlap_delay"] = delay
    engine = build(ds_config(block, momentum=0.9))
    ctl = engine.risgd
    seen = snapshot_rounds(ctl)
    calls, states, views, after_views = [], [], [], []
    for s in range(tau * rounds):
        with record_collectives() as c:
            train_step(engine, rank, s)
        calls.append([(name, level(ranks), is_async) for name, ranks, is_async in c])
        if ctl.is_average():
            before = state(engine)
            with ctl.averaged():
                views.append(state(engine))
            after_views.append(torch.equal(torch.cat([v.flatten() for v in before.values() if v.is_floating_point()]),
                                           torch.cat([v.flatten() for v in state(engine).values()
                                                      if v.is_floating_point()])))
        states.append(state(engine))
    pending_step = ctl.in_flight.apply_step if ctl.in_flight else None
    stats = ctl.consensus()
    # the same run without looking at the averages: the views changed nothing
    blind = build(ds_config(block, momentum=0.9))
    for s in range(tau * rounds):
        train_step(blind, rank, s)
    blind.risgd.consensus()
    return {"calls": calls, "states": states, "rounds": seen, "views": views, "restored": after_views,
            "final": state(engine), "blind_final": state(blind), "stats": stats, "pending_step": pending_step}


def run_all(rank: int, world_size: int, ckpt_dir: str) -> dict:
    assert world_size == 2 * NODE
    return {
        "node_sync": scenario_node_sync(rank),
        "node_intra": scenario_node_intra(rank),
        "node_failure": scenario_node_failure(rank),
        "overlap_flat": scenario_overlap(rank, 1),
        "overlap_flat_delay": scenario_overlap(rank, 1, delay=1, rounds=2),
        "overlap_node": scenario_overlap(rank, NODE, rounds=2),
        "overlap_failure": scenario_overlap_failure(rank),
        "resume_node": scenario_resume(rank, os.path.join(ckpt_dir, "node"), {"tau": 4, "node_size": NODE},
                                       total=16),
        "resume_overlap": scenario_resume(rank, os.path.join(ckpt_dir, "overlap"),
                                          {"tau": 4, "overlap": True, "node_size": NODE, "tau_intra": 2}, total=16),
    }
