"""A one-node fault-tolerant run in a real torchft lighthouse and manager (tests/test_membership.py)."""

from __future__ import annotations

import dataclasses

from tests.engine_workers import build, ds_config, train_step

_COUNTERS = ("rounds", "bytes_allreduced", "comm_seconds", "retries", "retry_seconds", "divergence_sum")


def scenario_one_live_node(rank: int, world_size: int, lighthouse: str) -> dict:
    """One node of one worker meets the lighthouse, trains through two rounds, then runs a round of the
    membership by hand: what it returns, what it changed, and what torchft itself holds (read by the test only,
    to compare: the engine reads no private field of torchft)."""
    engine = build(ds_config({"tau": 2, "fault_tolerance": "torchft", "op_timeout_s": 10.0,
                              "quorum_timeout_s": 30.0}))
    ctl = engine.risgd
    healed = ctl.go_live(0, 1, lighthouse=lighthouse)
    for step in range(4):
        train_step(engine, rank, step)
    view = ctl.membership_view()
    out: dict = {"healed": healed, "view_quorum": view.quorum_id, "current_quorum": ctl.live.current.quorum_id,
                 "torchft_quorum": ctl.live.manager._quorum_id, "members": sorted(view.members),
                 "live_workers": sorted(view.live_workers), "workers": view.workers, "healing": view.healing,
                 "rounds": ctl.rounds}
    try:
        view.quorum_id = 99  # type: ignore[misc]
        out["view_frozen"] = False
    except dataclasses.FrozenInstanceError:
        out["view_frozen"] = True
    # a round of the membership's, by hand: it returns its report and leaves the controller's counters alone
    before = {k: getattr(ctl, k) for k in _COUNTERS}
    report = ctl.membership.live_round(ctl.averaging, lambda: (ctl.steps, ctl.rounds), blocking=True)
    out["untouched"] = {k: getattr(ctl, k) for k in _COUNTERS} == before
    out["phases"] = len(report.reports)
    out["report_bytes"] = sum(r.bytes_sent for r in report.reports)
    out["in_flight"] = report.in_flight is not None
    ctl._account_live(report)  # the controller adds it up
    out["accounted_bytes"] = ctl.bytes_allreduced - before["bytes_allreduced"]
    ctl.membership.leave()
    return out
