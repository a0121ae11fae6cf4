"""Live recovery on torchft (fault_tolerance: torchft): a real lighthouse (torchft_lighthouse), real
managers and gloo groups, nodes of risgd_hosts.live_node crashed, frozen and brought back from outside."""

from __future__ import annotations

import os

import pytest

from risgd_hosts.live_cluster import LiveCluster, first_step_after

pytestmark = pytest.mark.slow

PACE = ["--step-seconds", "0.03", "--tau", "2", "--op-timeout", "2", "--quorum-timeout", "20"]


def _steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "loss" in r]


def _digest_at(records: list[dict], step: int) -> str | None:
    return next((r.get("digest") for r in records if "loss" in r and r["step"] == step), None)


def test_power_cut_mid_round_crash_and_rejoin_by_healing(tmp_path):
    """Node 2 goes silent inside a round's collective (a power cut as its peers see it): the round fails at
    the operation timeout and is redone among the survivors from their own models (no step trained again).
    Node 2 comes back, is healed from a live peer over the network (no checkpoint file) and its model after
    its first round equals theirs. Then node 1 crashes between rounds and the others go on without it."""
    with LiveCluster(str(tmp_path), 3, ["--steps", "260", *PACE]) as c:
        c.start(0)
        c.start(1)
        c.start(2, ["--freeze-at-round", "8"])
        c.wait_for(lambda: any(r.get("event") == "freeze" for r in c.records(2)), 180, "node 2 freezing itself")
        frozen_at = next(r["t"] for r in c.records(2) if r.get("event") == "freeze")
        c.wait_step(0, 40)
        c.kill(2)
        c.start(2)  # comes back with nothing: healed from a live peer
        c.wait_for(lambda: any(r.get("event") == "live" for r in c.records(2)[2:]), 120, "node 2 back")
        c.wait_step(2, c.step(0) + 6)
        crashed_at = c.kill(1)
        codes = c.wait_all(240)
        recs = {w: c.records(w) for w in range(3)}
    assert codes == {0: 0, 1: -9, 2: 0}, (codes, open(tmp_path / "n0.err").read()[-2000:])
    for w in (0, 1):  # the survivors of the power cut: every step once, the failed round redone, not its steps
        steps = _steps(recs[w])
        assert steps == list(range(1, steps[-1] + 1)), f"node {w} trained a step twice or skipped one"
        lost = next(r for r in recs[w] if r.get("event") == "membership" and r["lost"] == [2])
        assert lost["failed_attempts"] >= 1, lost
        resumed = first_step_after(recs[w], frozen_at)
        assert resumed["t"] - frozen_at < 2 + 6, "the survivors waited far longer than the operation timeout"
    healed = [r for r in recs[2] if r.get("event") == "live"][-1]
    assert healed["healed"] and healed["step"] > 40, healed
    assert healed["digest"] == _digest_at(recs[0], healed["step"]) == _digest_at(recs[1], healed["step"])
    after_crash = next(r for r in recs[0] if r.get("event") == "membership" and r["lost"] == [1])
    assert after_crash["members"] == [0, 2] and after_crash["t"] > crashed_at
    done = {w: next(r for r in recs[w] if r.get("event") == "done") for w in (0, 2)}
    assert done[0]["digest"] == done[2]["digest"] and done[0]["step"] == 260


def test_below_the_floor_and_a_lost_lighthouse_stop_with_one_line(tmp_path):
    """min_nodes=2: after one of two nodes crashes, the other waits floor_wait_s for it, then stops (exit 2,
    one line). A lost lighthouse (torchft's single point) stops a run with one line too."""
    floor = LiveCluster(str(tmp_path / "floor"), 2, ["--steps", "2000", *PACE, "--min-nodes", "2",
                                                     "--floor-wait", "1"])
    alone = LiveCluster(str(tmp_path / "lighthouse"), 1, ["--steps", "2000", *PACE[:-1], "3"])
    try:
        floor.start(0)
        floor.start(1)
        alone.start(0)
        floor.wait_step(0, 10, timeout=180)
        floor.kill(1)
        alone.wait_step(0, 10, timeout=180)
        alone.kill_lighthouse()
        assert floor.wait_all(120) == {0: 2, 1: -9}
        assert alone.wait_all(120) == {0: 2}
    finally:
        floor.close()
        alone.close()
    for cluster, words in ((floor, "fewer than min_nodes=2"), (alone, "no quorum from the lighthouse")):
        errors = [line for line in open(os.path.join(cluster.dir, "n0.err")).read().splitlines()
                  if line.startswith("error")]
        assert len(errors) == 1 and words in errors[0], errors
        assert cluster.records(0)[-1]["event"] == "stopped"

