"""Live recovery on torchft (fault_tolerance: torchft): a real lighthouse (torchft_lighthouse), real
managers and gloo groups, nodes of risgd_hosts.live_node crashed, frozen and brought back from outside."""

from __future__ import annotations

import os

import pytest

from risgd_hosts.live_cluster import LiveCluster, first_step_after

pytestmark = pytest.mark.slow

PACE = ["--step-seconds", "0.03", "--tau", "2", "--op-timeout", "2"]


def _steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "loss" in r]


def _digest_at(records: list[dict], step: int) -> str | None:
    return next((r.get("digest") for r in records if "loss" in r and r["step"] == step), None)


def _errors(cluster: LiveCluster, worker: int) -> list[str]:
    with open(os.path.join(cluster.dir, f"n{worker}.err")) as f:
        return [line for line in f.read().splitlines() if line.startswith("error")]


def test_power_cut_mid_round_rejoin_by_healing_crash_and_lost_lighthouse(tmp_path):
    """Node 1 goes silent inside a round's collective (a power cut as its peer sees it): the round fails at
    the operation timeout and is redone by the survivor from its own model (no step trained again). Node 1
    comes back, is healed from the live peer over the network (no checkpoint file) and its model after its
    first round equals the peer's. Then it crashes between rounds and node 0 goes on alone; then the
    lighthouse (torchft's single point) is lost and node 0 stops with one line (exit 2). Beside it, a node
    alone under min_nodes=2 waits floor_wait_s for the other at the start, then stops with one line."""
    c = LiveCluster(str(tmp_path / "run"), 2, ["--steps", "100000", *PACE, "--quorum-timeout", "4"])
    floor = LiveCluster(str(tmp_path / "floor"), 2, ["--steps", "100", *PACE, "--min-nodes", "2",
                                                     "--floor-wait", "2"])
    try:
        c.start(0)
        c.start(1, ["--freeze-at-round", "8"])
        floor.start(0)
        c.wait_for(lambda: any(r.get("event") == "freeze" for r in c.records(1)), 180, "node 1 freezing itself")
        frozen_at = next(r["t"] for r in c.records(1) if r.get("event") == "freeze")
        c.wait_step(0, 40)
        c.kill(1)
        c.start(1)  # comes back with nothing: healed from the live peer
        c.wait_for(lambda: any(r.get("event") == "live" for r in c.records(1)[2:]), 120, "node 1 back")
        c.wait_step(1, c.step(0) + 6)
        crashed_at = c.kill(1)
        c.wait_for(lambda: any(r.get("event") == "membership" and r["lost"] == [1] and r["t"] > crashed_at
                               for r in c.records(0)), 60, "node 0 going on without node 1")
        c.wait_step(0, c.step(0) + 4)
        c.kill_lighthouse()
        assert c.wait_all(60)[0] == 2
        assert floor.wait_all(120) == {0: 2}
    finally:
        c.close()
        floor.close()
    survivor, back = c.records(0), c.records(1)
    steps = _steps(survivor)
    assert steps == list(range(1, steps[-1] + 1)), "node 0 trained a step twice or skipped one"
    lost = next(r for r in survivor if r.get("event") == "membership" and r["lost"] == [1])
    assert lost["failed_attempts"] >= 1 and lost["t"] > frozen_at, lost
    assert first_step_after(survivor, frozen_at)["t"] - frozen_at < 2 + 6, "waited far longer than the timeout"
    healed = [r for r in back if r.get("event") == "live"][-1]
    assert healed["healed"] and healed["step"] > 40, healed
    assert healed["digest"] == _digest_at(survivor, healed["step"])
    assert _digest_at(back, healed["step"] + 2) == _digest_at(survivor, healed["step"] + 2)  # the next round too
    errors = _errors(c, 0)
    assert len(errors) == 1 and "no quorum from the lighthouse" in errors[0], errors
    assert survivor[-1]["event"] == "stopped"
    errors = _errors(floor, 0)
    assert len(errors) == 1 and "below the floor at the start" in errors[0] and "min_nodes=2" in errors[0], errors


def test_a_split_commit_is_healed_and_nodes_holding_different_anchors_are_refused(tmp_path):
    """Two runs side by side. In one (4 synchronous warm-up steps first: DeepSpeed's gradient all-reduce spans
    a node only, so a round after each makes the nodes one), node 1's commit of round 6 fails where node 0's
    succeeds (torchft agrees a commit only within a node): node 1 is behind, is healed to node 0's step at the
    next quorum and goes on from there, and both end on the same model. In the other, node 1 holds another
    anchor than node 0 (as a node resumed from another timeline's checkpoint would): the first round's anchor
    votes disagree and both nodes stop with one line, exit 2, instead of averaging around two anchors for the
    rest of the run. Both rounds are compressed (int8): the count and the anchor votes ride in the
    two-phase round's fp32 rest, and the healed node, with no residuals of its own, decodes the same bits."""
    split = LiveCluster(str(tmp_path / "split"), 2, ["--steps", "40", *PACE, "--warmup", "4", "--compress", "int8"])
    apart = LiveCluster(str(tmp_path / "apart"), 2, ["--steps", "40", *PACE, "--compress", "int8"])
    try:
        split.start(0)
        split.start(1, ["--drop-commit-at-round", "6"])
        apart.start(0)
        apart.start(1, ["--nudge-anchor"])
        assert apart.wait_all(120) == {0: 2, 1: 2}
        assert split.wait_all(180) == {0: 0, 1: 0}
    finally:
        split.close()
        apart.close()
    for k in range(2):
        errors = _errors(apart, k)
        assert len(errors) == 1 and "different anchors" in errors[0], errors
    first, behind = split.records(0), split.records(1)
    dropped = next(r for r in behind if r.get("event") == "commit dropped")
    healed = next(r for r in behind if r.get("event") == "healed")
    assert healed["to"] > dropped["step"] and healed["digest"] == _digest_at(first, healed["to"]), (dropped, healed)
    assert _steps(first) == list(range(1, 41))
    done = [next(r for r in recs if r.get("event") == "done") for recs in (first, behind)]
    assert done[0]["digest"] == done[1]["digest"]


def test_the_live_state_a_joiner_fetches_is_a_copy_taken_at_the_quorum():
    """torchft's HTTP transport serves CPU tensors by reference when the joiner asks; an overlapped peer is back
    at its local steps by then. What a peer registers is served as a snapshot: later steps do not reach it."""
    import torch

    from risgd_ext.live import snapshot

    weight, momentum, lr = torch.ones(4), {"buf": torch.zeros(4)}, [0.1]
    state = {"module": {"w": weight}, "optimizer": {"state": {0: momentum}, "lrs": lr}, "steps": 875}
    served = snapshot(state)
    weight.add_(1.0)  # the peer's next local steps, in place
    momentum["buf"].add_(2.0)
    lr[0] = 0.2
    assert torch.equal(served["module"]["w"], torch.ones(4))
    assert torch.equal(served["optimizer"]["state"][0]["buf"], torch.zeros(4))
    assert served["optimizer"]["lrs"] == [0.1] and served["steps"] == 875
    assert not torch.equal(state["module"]["w"], served["module"]["w"])  # the check can fail: by reference it would


def test_a_lighthouse_that_does_not_answer_is_one_line_within_seconds(tmp_path):
    """Issue 46: a lighthouse down or mistyped took 21 s, exit 1 and a traceback (then advice to start the same
    command again, which failed the same way). It is probed before anything else: one line naming the address
    and how to start one, exit 2, once it has not answered for 10 s (a lighthouse started with the nodes may need
    a moment)."""
    import subprocess
    import sys
    import time

    from risgd_common.ports import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "risgd_hosts.live_node", "--worker", "0", "--workers", "2",
                           "--port", str(free_port()), "--log", str(tmp_path / "n0.jsonl")],
                          env=dict(os.environ, TORCHFT_LIGHTHOUSE=dead), capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: no lighthouse answers at {dead}") and "torchft_lighthouse" in errors[0]
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 40  # the probe waits 10 s for it
