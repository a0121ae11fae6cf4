"""The defects the storm bench found in live recovery on torchft (docs/storms.md, "Defects found"), each on real
processes: a real ``torchft_lighthouse`` and nodes of ``risgd_hosts.live_node``, broken from outside."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from risgd_hosts.live_cluster import LiveCluster, lighthouse_command, wait_port

pytestmark = pytest.mark.slow

PACE = ["--step-seconds", "0.03", "--tau", "2", "--op-timeout", "2"]


def _step_times(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["t"]) for r in records if "loss" in r]


def _stall(records: list[dict], t0: float) -> float:
    """The node's longest wait between two steps, from its last step before ``t0`` on (its stall at a fault at
    ``t0``); to its last record if it trained no step after ``t0`` (it stopped)."""
    times = [t for _, t in _step_times(records)]
    times = [t for t in times if t <= t0][-1:] + [t for t in times if t > t0]
    if records and (not times or records[-1]["t"] > times[-1]) and _done(records) is None:
        times.append(records[-1]["t"])
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def _first_step_after(records: list[dict], t0: float) -> float:
    return next((t for _, t in _step_times(records) if t > t0), float("inf"))


def _done(records: list[dict]) -> dict | None:
    return next((r for r in records if r.get("event") == "done"), None)


def test_a_lighthouse_restarted_on_its_port_lets_the_nodes_go_on(tmp_path):
    """Defect 1: the lighthouse killed while the nodes ask it for quorums (a round every 2 steps) and started again
    on the same port 3 s later. torchft's manager server asked the lighthouse once per quorum (quorum_retries=0):
    a call that failed (in flight at the kill, or made while it was down) was never answered to the node's ranks,
    which waited out quorum_timeout_s (here 20 s) and stopped, exit 2. Now every node trains again within seconds
    of the lighthouse's return, and both end on the same model. Node 1 reaches the new lighthouse 2 s after node 0
    (frozen meanwhile): the new lighthouse's first quorum holds node 0 alone, which waits for the last quorum's
    nodes instead of training on alone (node 1 would have been healed to node 0's step, its steps skipped), so
    each node trains every step once."""
    quorum_timeout = 20.0
    c = LiveCluster(str(tmp_path / "run"), 2, ["--steps", "240", *PACE, "--quorum-timeout", f"{quorum_timeout:g}"])
    try:
        c.start(0)
        c.start(1)
        c.wait_step(0, 40, timeout=120)
        c.wait_step(1, 40, timeout=60)
        killed = c.kill_lighthouse()
        c.freeze(1)  # node 1 reaches the new lighthouse 2 s after node 0 (each node's manager reconnects on its own)
        time.sleep(3.0)
        c.lighthouse = subprocess.Popen(lighthouse_command(c.port), stdout=subprocess.DEVNULL,
                                        stderr=open(c._path("lighthouse.err"), "a"))
        assert wait_port(c.port, [], process=c.lighthouse), "the lighthouse did not start again on its port"
        back = time.time()  # its start takes 2-6 s here (the command imports torch)
        time.sleep(2.0)
        os.killpg(c.nodes[1].pid, signal.SIGCONT)
        codes = c.wait_all(90)
    finally:
        c.close()
    records = [c.records(k) for k in range(2)]
    stalls = [_stall(r, killed) for r in records]
    resumed = [_first_step_after(r, back) - back for r in records]
    print(f"lighthouse down {back - killed:.1f} s; stalls {stalls}; first step after its return {resumed}")
    assert codes == {0: 0, 1: 0}, (codes, stalls, [r[-1] for r in records])
    for recs in records:
        steps = [s for s, _ in _step_times(recs)]
        assert steps == list(range(1, 241)), "a step trained twice or skipped (a node healed)"
    assert max(resumed) < quorum_timeout / 2, resumed  # reconnected and one round's retry at most
    done = [_done(r) for r in records]
    assert done[0]["digest"] == done[1]["digest"], done


def test_two_nodes_lost_at_once_cost_the_survivors_the_operation_timeout(tmp_path):
    """Defect 2: of 4 nodes, node 1 crashes (SIGKILL) and 0.4 s later node 2 goes silent (SIGSTOP: a power cut as
    its peers see it), while the others wait in a quorum. The lighthouse forms the next quorum once node 1's
    heartbeat is 1 s old, with node 2 in it: node 2 had asked for that quorum and its heartbeat is still fresh.
    The survivors build that quorum's gloo group and wait for node 2's address on the store: that wait was
    bounded by quorum_timeout_s (here 20 s; 60 s by default: the storm's 60.5 s), and is now bounded by
    op_timeout_s (2 s), like every cross-node operation; then the round is retried among the survivors."""
    quorum_timeout = 20.0
    c = LiveCluster(str(tmp_path / "run"), 4, ["--steps", "200", *PACE, "--quorum-timeout", f"{quorum_timeout:g}"])
    try:
        for k in range(4):
            c.start(k)
        for k in range(4):
            c.wait_step(k, 40, timeout=120)
        lost = c.kill(1)
        time.sleep(0.4)
        c.freeze(2)
        codes = {k: c.nodes[k].wait(timeout=90) for k in (0, 3)}
    finally:
        c.close()
    survivors = [c.records(k) for k in (0, 3)]
    stalls = [_stall(r, lost) for r in survivors]
    events = [e for e in survivors[0] if e.get("event") == "membership" and e["t"] > lost]
    seen = [(e["members"], round(e["seconds"], 2), e["failed_attempts"], round(e["attempt_seconds"], 2))
            for e in events]
    print(f"stalls {stalls}; membership events (members, quorum s, failed attempts, their s) {seen}")
    assert codes == {0: 0, 3: 0}, codes
    assert events and events[-1]["members"] == [0, 3], events
    assert max(stalls) < quorum_timeout / 2, stalls  # the operation timeout and a heartbeat timeout, not 20 s
    done = [_done(r) for r in survivors]
    assert done[0]["digest"] == done[1]["digest"], done


def test_a_group_built_again_under_an_old_quorums_prefix_connects():
    """Defect 1's second half: a lighthouse started again counts its quorum ids from 1 again, and torchft's manager
    builds each quorum's gloo group under HOST:PORT/torchft/<quorum id>/<rank> on the same node's store. gloo read
    the addresses the earlier group of that id had left there: connection refused (each try of a group, and a
    round, lost). Each use of a prefix now gets a generation of its own on the store."""
    from risgd_hosts.local import run_ranks
    from tests.storm_defect_workers import scenario_prefix_reused

    results = run_ranks(scenario_prefix_reused, 2, timeout=120)
    for out in results:
        assert [prefix for prefix, _, _ in out] == ["torchft/2/0", "torchft/3/0", "torchft/2/0"]
        assert [result for _, result, _ in out] == [[2.0] * 4] * 3, out
