"""The node level and overlapped averaging on real DeepSpeed engines in a real 4-rank gloo group,
seen as 2 nodes x 2 ranks (ranks 0, 1 on node 0; 2, 3 on node 1).

Every scenario runs in one spawn of 4 processes (module fixture, ~15 s); each test checks one
behaviour on the returned data. Collectives are recorded as (name, level, async_op): level "node"
is a group inside one node, "cross" a group that spans nodes.
"""

from __future__ import annotations

import pytest
import torch

from risgd_ext.flat import SLOT
from risgd_hosts.local import run_ranks
from tests.hier_workers import run_all

WORLD, NODE = 4, 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(run_all, WORLD, str(tmp_path_factory.mktemp("ckpt")), timeout=600)


def flat(state: dict, params_only: bool = False) -> torch.Tensor:
    return torch.cat([v.flatten().double() for k, v in state.items() if v.is_floating_point()
                      and not (params_only and "running" in k)])


def same(a: dict, b: dict, params_only: bool = False) -> bool:
    return torch.equal(flat(a, params_only), flat(b, params_only))


def test_node_sync_collectives_per_level(results):
    calls = results[0]["node_sync"]["calls"]
    for step, c in enumerate(calls, 1):
        if step % 4:  # a local step: the node's gradient all-reduce, nothing across nodes
            assert c == [("all_reduce", "node", False)], (step, c)
        else:  # a round: BatchNorm statistics to the node's mean, one cross all-reduce per slice owner,
            # then the other slice broadcast inside the node (one per node rank)
            assert [x for x in c if x[1] == "cross"] == [("all_reduce", "cross", False)], (step, c)
            assert c.count(("broadcast", "node", False)) == NODE, (step, c)
            assert c.count(("all_reduce", "node", False)) == 2, (step, c)  # gradients + BN statistics
    for r in results:
        stats = r["node_sync"]["stats"]
        assert (stats["node_size"], stats["workers"], stats["rounds"], stats["inter_collectives"]) == (2, 2, 3, 3)
        assert r["node_sync"]["lean"]


def test_node_ranks_identical_every_step_all_ranks_after_rounds(results):
    per_rank = [r["node_sync"]["states"] for r in results]
    for step in range(len(per_rank[0])):
        s = [p[step] for p in per_rank]
        # a node's ranks share gradients every step: the same parameters (their BatchNorm
        # statistics are their own until the round, as in plain DeepSpeed)
        assert same(s[0], s[1], params_only=True) and same(s[2], s[3], params_only=True), step
        if (step + 1) % 4 == 0:
            assert all(same(s[0], x) for x in s[1:]), f"ranks differ after the round at step {step + 1}"
        else:
            assert not same(s[0], s[2], params_only=True), f"nodes made no local progress at {step + 1}"


def test_a_round_across_nodes_is_the_mean_of_the_nodes(results):
    rounds = [r["node_sync"]["rounds"] for r in results]
    n_params = sum(v.numel() for k, v in results[0]["node_sync"]["states"][0].items()
                   if v.is_floating_point() and "running" not in k)
    for i in range(3):
        before = [rd["before"][i][0].double() for rd in rounds]
        params = (before[0][:n_params] + before[2][:n_params]) / 2  # one model per node
        bn = sum(b[n_params:-SLOT] for b in before) / WORLD  # BatchNorm statistics: every rank's
        for rd in rounds:
            after = rd["after"][i][0].double()
            torch.testing.assert_close(after[:n_params], params, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(after[n_params:-SLOT], bn, rtol=1e-6, atol=1e-6)


def test_intra_node_averages_every_tau_intra(results):
    per_rank = [r["node_intra"]["states"] for r in results]
    calls = results[0]["node_intra"]["calls"]
    for step, c in enumerate(calls, 1):
        s = [p[step - 1] for p in per_rank]
        if step % 4 == 0:
            assert all(same(s[0], x) for x in s[1:]), step
            assert ("all_reduce", "cross", False) in c
        elif step % 2 == 0:
            assert same(s[0], s[1]) and same(s[2], s[3]) and not same(s[0], s[2]), step
            assert c == [("all_reduce", "node", False)], (step, c)
        else:
            assert c == [], (step, c)
            assert not same(s[0], s[1], params_only=True), step


def test_a_failed_node_has_weight_zero_and_takes_the_average(results):
    rounds = [r["node_failure"]["rounds"] for r in results]
    for i, live_nodes in enumerate(([0, 1], [0], [0, 1])):
        before = [rd["before"][i][0].double()[:-SLOT] for rd in rounds]
        # synchronous nodes: the node's first rank stands for its parameters; statistics: every live rank's
        expected = sum(before[NODE * n] for n in live_nodes) / len(live_nodes)
        for rd in rounds:
            after = rd["after"][i][0].double()[:-SLOT]
            n = after.numel() - 24 * 2  # the BatchNorm1d(24) running mean and variance at the end
            torch.testing.assert_close(after[:n], expected[:n], rtol=1e-6, atol=1e-7)
    assert [r["node_failure"]["stats"]["rounds_down"] for r in results] == [0, 0, 1, 1]
    assert results[0]["node_failure"]["stats"]["down_workers"] == []  # the last round had every node


@pytest.mark.parametrize("name", ["overlap_flat", "overlap_flat_delay", "overlap_node"])
def test_overlap_never_blocks_a_local_step_on_the_network(results, name):
    calls = results[0][name]["calls"]
    tau = 4
    for step, c in enumerate(calls, 1):
        cross = [x for x in c if x[1] == "cross"]
        assert all(is_async for _, _, is_async in cross), (step, c)  # launched, never waited for here
        if step % tau == 0:
            assert cross, f"no round launched at step {step}"
        else:
            assert not cross, (step, c)
        if name != "overlap_node":  # flat: nothing else at all; the node level: its gradient all-reduce
            assert all(x == ("all_reduce", "cross", True) for x in c), (step, c)
        else:  # the fast link blocks: gradients every step, and at a round the BatchNorm statistics
            node = [("all_reduce", "node", False)] * (2 if step % tau == 0 else 1)
            assert [x for x in c if x[1] == "node"] == node, (step, c)


@pytest.mark.parametrize("name", ["overlap_flat", "overlap_flat_delay", "overlap_node"])
def test_overlap_delayed_update_against_a_single_process_reference(results, name):
    """x <- mean_j(x_j at the send) + (x - x at the send), applied `delay` steps after the send."""
    rounds = [r[name]["rounds"] for r in results]
    node = NODE if name == "overlap_node" else 1
    applied = len(rounds[0]["applied_after"])
    assert applied == len(rounds[0]["sent_steps"])  # every round applied (the last by consensus())
    for i in range(applied):
        sent = [rd["before"][i][0].double()[:-SLOT] for rd in rounds]
        n_params = sent[0].numel() - 48
        mean = sum(sent) / WORLD
        if node > 1:  # synchronous nodes: parameters from one rank per node
            mean[:n_params] = sum(sent[k][:n_params] for k in range(0, WORLD, node)) / (WORLD // node)
        for rd, x_sent in zip(rounds, sent):
            before = rd["applied_before"][i][0].double()[:-SLOT]
            after = rd["applied_after"][i][0].double()[:-SLOT]
            torch.testing.assert_close(after, mean + (before - x_sent), rtol=1e-6, atol=1e-6)
    # the average is applied at a step fixed by the schedule, never by the network
    delay = 1 if name == "overlap_flat_delay" else 4
    assert results[0][name]["pending_step"] == rounds[0]["sent_steps"][-1] + delay


def test_overlap_with_a_failed_rank(results):
    rounds = [r["overlap_failure"]["rounds"] for r in results]
    for i, live in enumerate(([0, 1, 2, 3], [0, 2, 3], [0, 1, 2, 3])):
        sent = [rd["before"][i][0].double()[:-SLOT] for rd in rounds]
        mean = sum(sent[j] for j in live) / len(live)
        for rd, x_sent in zip(rounds, sent):  # the failed rank too takes the live average
            before = rd["applied_before"][i][0].double()[:-SLOT]
            after = rd["applied_after"][i][0].double()[:-SLOT]
            torch.testing.assert_close(after, mean + (before - x_sent), rtol=1e-6, atol=1e-6)
    assert all(same(results[0]["overlap_failure"]["final"], r["overlap_failure"]["final"]) for r in results[1:])
    assert [r["overlap_failure"]["stats"]["rounds_down"] for r in results] == [0, 1, 0, 0]


@pytest.mark.parametrize("name", ["overlap_flat", "overlap_flat_delay", "overlap_node"])
def test_overlap_averaged_view_changes_nothing_and_consensus_ends_identical(results, name):
    runs = [r[name] for r in results]
    for i in range(len(runs[0]["views"])):
        assert all(same(runs[0]["views"][i], r["views"][i]) for r in runs[1:])  # the one averaged model
    assert all(all(r["restored"]) for r in runs)  # the local model is back after the view
    assert all(same(runs[0]["final"], r["final"]) for r in runs[1:])  # consensus(): bit-identical
    assert all(same(r["final"], r["blind_final"]) for r in runs)  # looking changed no bit of training
    for step in range(len(runs[0]["states"])):  # between applies the ranks hold their own models
        if step % 4 != 3:
            assert not same(runs[0]["states"][step], runs[-1]["states"][step])


@pytest.mark.parametrize("name", ["resume_node", "resume_overlap"])
def test_resume_mid_round_is_bitwise(results, name):
    for r in results:
        res = r[name]
        assert res["start"] == 6
        assert same(res["straight"], res["resumed"])
        for key in ("steps", "rounds", "bytes_allreduced", "divergence", "intra_collectives"):
            assert res["stats"][0][key] == res["stats"][1][key], key
        assert same(*res["final"]) and res["final_rounds"] == (4, 4)
    if name == "resume_overlap":
        assert results[0][name]["pending_at_end"]  # a round was in flight at the end, saved and restored
    assert all(same(results[0][name]["final"][0], r[name]["final"][0]) for r in results[1:])
