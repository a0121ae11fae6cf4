"""The composition issue's defects, each with a test that failed on the code before its fix (the
composed cases themselves are in tests/test_reference.py, against the reference)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from risgd_ext.codec import CODECS
from risgd_ext.flat import SLOT, FlatModel


@pytest.mark.parametrize("name", ["int8", "int4", "int2", "topk"])
def test_a_tiny_block_never_turns_error_feedback_into_nan(name):
    """Defect 1: a block whose absmax is subnormal made levels/absmax inf, and the lossy value (what error
    feedback subtracts) NaN; a displacement that moved and then stopped reached such blocks by itself."""
    codec = CODECS[name]
    x = torch.zeros(300)
    x[5], x[7] = 1e-40, -3e-41
    _, sent = codec.encode_lossy(x)
    assert torch.isfinite(sent).all()
    residual, d = torch.zeros(300), torch.zeros(300)
    d[:4] = torch.tensor([1e-3, -2e-5, 3e-7, 1e-38])
    for _ in range(300):  # it moved once, then stays: the residual is all that is sent
        _, sent = codec.encode_lossy(d + residual)
        residual = d + residual - sent
        d = torch.zeros(300)
        assert torch.isfinite(residual).all() and torch.isfinite(sent).all()


def test_divergence_is_nan_when_it_cannot_be_computed():
    """Defect 9 (its measurement): a NaN in the sums gave divergence 0.0 (``nan > 0`` is False)."""
    p = torch.nn.Parameter(torch.ones(8))
    model = FlatModel([p], [])
    sums = [torch.zeros_like(model.buffers[0])]
    sums[0][2] = float("nan")
    sums[0][-SLOT] = 1.0
    assert math.isnan(model.finish(sums, 1))
    fresh = FlatModel([torch.nn.Parameter(torch.ones(8))], [])
    assert fresh.finish([torch.zeros_like(fresh.buffers[0])], 1) == 0.0  # no spread: 0, not NaN


@pytest.mark.slow
def test_each_rank_of_a_node_level_elastic_worker_keeps_its_own_state(tmp_path):
    """Defect 7: every rank of a node wrote and loaded one file, risgd_worker{W}.pt; the last writer won and
    on resume the node's other ranks took its residual, which covers another slice."""
    from defect_workers import scenario_node_level_worker_state

    from risgd_hosts.local import run_ranks

    results = run_ranks(scenario_node_level_worker_state, 4, str(tmp_path), timeout=300)
    assert results[0]["files"] == [f"risgd_worker{w:05d}_local{k:02d}.pt" for w in range(2) for k in range(2)]
    assert all(r["nonzero"] and r["own_back"] for r in results)


def test_the_ranks_of_an_elastic_node_draw_their_own_random_streams(tmp_path):
    """Defect 10: the ranks of one node of an elastic run shared a dropout stream (the worker number stood
    where the rank belongs); each must draw the stream its rank has in a fixed run of the same layout."""
    from risgd_trainer.elastic import nodes_for
    from risgd_trainer.run_config import resolve_run

    for world_size in (1, 2):
        run = resolve_run("recipes/digits.yaml", [f"runs_dir={tmp_path}", "run_name=el", "elastic.workers=3"],
                          world_size)
        streams = [nodes_for(run, {"workers": 3}, {}, w).rng_id(r) for w in range(3) for r in range(world_size)]
        assert streams == list(range(3 * world_size))  # one per rank, the fixed run's numbering


def _done_digests(cluster, workers) -> list[str]:
    return [next(r for r in cluster.records(w) if r.get("event") == "done")["digest"] for w in workers]


@pytest.mark.slow
def test_warm_up_without_outer_step_a_split_commit_under_overlap_and_a_twin_refused_before_any_quorum(tmp_path):
    """Three defects of live runs, on two runs of two nodes side by side (overlap, int8, 4 warm-up steps):

    - 4: the round after each warm-up step went through the outer optimizer (outer lr and Nesterov momentum on
      one-step pseudo-gradients for the whole warm-up); a fixed run never does. With an outer step configured
      (run "outer") the model after each warm-up step equals the run without one ("plain"); the first round
      after the warm-up differs (the check can fail).
    - 2: with overlap_delay == tau, the node whose commit failed (node 1 of "outer", round 6) resent its round
      while the other started the next one at the same torchft step: the anchor votes differed and every node
      stopped (AnchorsDiffer). The node behind is healed instead, and both end on one model.
    - 12: a node started twice was refused only after it had entered a quorum, every live node stalling while
      it was in (1.9 s and 10.4 s measured on 3 nodes). A twin of node 1 of "plain" is refused from the
      lighthouse's list of heartbeating replicas, before its first quorum: the live nodes' quorum never
      changes. (A node restarted right after its crash is no twin: tests/test_live.py restarts one.)"""
    from risgd_hosts.live_cluster import LiveCluster

    pace = ["--tau", "2", "--warmup", "4", "--overlap", "--compress", "int8", "--step-seconds", "0.03",
            "--op-timeout", "2"]
    plain = LiveCluster(str(tmp_path / "plain"), 2, ["--steps", "100000", *pace])
    outer = LiveCluster(str(tmp_path / "outer"), 2, ["--steps", "40", *pace, "--outer-lr", "0.7",
                                                     "--outer-momentum", "0.5"])
    try:
        for c in (plain, outer):
            c.start(0)
        plain.start(1)
        outer.start(1, ["--drop-commit-at-round", "6"])
        plain.wait_step(0, 20)
        before = plain.records(0)[-1]["quorum"]
        first = plain.nodes[1]
        twin = plain.start(1)  # the first node 1 runs on
        assert twin.wait(timeout=60) == 2
        plain.wait_step(0, plain.step(0) + 10)
        plain.nodes[1] = first
        assert outer.wait_all(180) == {0: 0, 1: 0}
    finally:
        plain.close()
        outer.close()
    quorums = {r["quorum"] for r in plain.records(0) if "quorum" in r and r["quorum"] >= before}
    assert quorums == {before}  # nobody entered or left the quorum: the twin never was in one
    assert "another live node already serves manifest worker 1" in open(os.path.join(plain.dir, "n1.err")).read()

    def digests(c, worker):
        return {r["step"]: r["digest"] for r in c.records(worker) if "loss" in r and r.get("digest")}

    for w in range(2):
        a, b = digests(plain, w), digests(outer, w)
        assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]  # the warm-up: no outer step
    def loss(c, step):
        return next(r["loss"] for r in c.records(0) if "loss" in r and r["step"] == step)

    assert loss(plain, 12) != loss(outer, 12)  # the rounds after it take the outer step (the check can fail)
    assert any(r.get("event") == "commit dropped" for r in outer.records(1))
    assert any(r.get("event") == "healed" for r in outer.records(1))
    assert _done_digests(outer, [0]) == _done_digests(outer, [1])


@pytest.mark.slow
def test_a_failed_overlapped_round_is_resent_from_its_residuals_wherever_the_failure_is_found(tmp_path):
    """Defects 8 and 3. Node 1 freezes inside round 3's first collective (overlap, int8): node 0 resends round
    3 among the survivors (itself), found failed at its apply step (8: its resend encoded d + e1, the residual
    the failed first send left, instead of d + e_old), or earlier by an evaluation's averaged() or a
    checkpoint's state_dict() (3: the survivors crashed; only the apply step turned the error into a resend).
    Beside them node 1 leaves cleanly before round 3 and node 0 runs round 3 alone at its first try: every run
    must give node 0 that run's model, each step trained once."""
    from risgd_hosts.live_cluster import LiveCluster

    pace = ["--steps", "24", "--tau", "4", "--overlap", "--overlap-delay", "2", "--compress", "int8",
            "--op-timeout", "2", "--quorum-timeout", "30"]
    runs = {look: LiveCluster(str(tmp_path / look), 2, [*pace, "--look", look]) for look in ("none", "view", "state")}
    gone = LiveCluster(str(tmp_path / "gone"), 2, pace)
    try:
        for c in (*runs.values(), gone):
            c.start(0)
            c.start(1, ["--freeze-at-round", "3"] if c is not gone else ["--exit-after-step", "15"])
        assert gone.wait_all(180)[0] == 0
        for c in runs.values():  # node 0 ends (node 1 stays frozen): its exit status says how
            assert c.nodes[0].wait(timeout=180) == 0, open(os.path.join(c.dir, "n0.err")).read()[-2000:]
    finally:
        for c in (*runs.values(), gone):
            c.close()
    for look, c in runs.items():
        steps = [r["step"] for r in c.records(0) if "loss" in r]
        assert steps == list(range(1, 25)), (look, steps[-3:])
        done = next(r for r in c.records(0) if r.get("event") == "done")
        assert done["retries"] >= 1, look  # round 3 failed there and was resent
        assert done["digest"] == _done_digests(gone, [0])[0], look


@pytest.mark.slow
def test_a_joiner_whose_heal_round_failed_does_not_count_its_peers_progress_twice(tmp_path):
    """Defect 6: torchft's should_commit loads the peer's state before the vote, so a joiner whose heal round
    failed held a copy of its peer, and the retried round counted it as a contributor: the peer's progress
    twice. Nodes 0 and 2 run; node 1 joins and its heal round fails; the retried round's average must be
    that of nodes 0 and 2 alone, as in a run where node 1 never came."""
    from risgd_hosts.live_cluster import LiveCluster

    # 2000 steps (100 s) that the test never waits for (it closes both runs once node 1 is in): on a loaded
    # machine node 1's start took longer than 200 steps, and nodes 0 and 2 had finished before it came
    pace = ["--steps", "2000", "--tau", "2", "--step-seconds", "0.05", "--op-timeout", "2", "--floor-wait", "3"]
    # both runs start as nodes 0 and 2 together (a quorum of 2 at least: on a loaded machine one could start
    # alone and heal the other in), and a starved node's missed heartbeat drops no one (3 s)
    joined = LiveCluster(str(tmp_path / "joined"), 3, pace, heartbeat_ms=3000, min_replicas=2)
    alone = LiveCluster(str(tmp_path / "alone"), 3, pace, heartbeat_ms=3000, min_replicas=2)
    try:
        for c in (joined, alone):
            c.start(0)
            c.start(2)
        joined.wait_step(0, 6)
        joined.start(1, ["--fail-heal-round"])
        joined.wait_for(lambda: any(r.get("event") == "live" for r in joined.records(1)), 120, "node 1 live")
        at = next(r for r in joined.records(1) if r.get("event") == "live")["step"]
        joined.wait_step(0, at + 2)
        alone.wait_step(0, at + 2)
    finally:
        joined.close()
        alone.close()
    assert any(r.get("event") == "heal round failed" for r in joined.records(1))
    live = next(r for r in joined.records(1) if r.get("event") == "live")
    assert live["healed"]
    digest = {name: next(r["digest"] for r in c.records(0) if r.get("step") == at and r.get("digest"))
              for name, c in (("joined", joined), ("alone", alone))}
    assert digest["joined"] == digest["alone"] and live["digest"] == digest["joined"]


@pytest.mark.slow
def test_a_round_with_no_finite_contribution_stops_every_rank_naming_the_step():
    """Issue 42, part 4: only when no finite contribution remains does the run stop, in one line naming the step
    (train.py turns it into one error line, exit 1, the last checkpoint kept)."""
    from defect_workers import scenario_no_finite_contribution

    from risgd_hosts.local import run_ranks

    said = run_ranks(scenario_no_finite_contribution, 2, timeout=300)
    assert said == ["step 2: every contribution to this round was non-finite (NaN or inf); no average to go on "
                    "from"] * 2
