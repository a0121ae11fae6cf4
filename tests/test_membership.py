"""Who is live has one owner (risgd_ext.membership): the failure schedule, the quorum's nodes, the events,
the step a node was healed to and the floor live there; its fault-tolerant round returns a report that the
controller adds up; the trainer reads a frozen view; no private field of torchft is read."""

from __future__ import annotations

import os
import subprocess

import pytest

from risgd_ext.config import parse_block
from risgd_ext.live import LiveNodes, _reconfigurable_gloo
from risgd_ext.membership import Membership, failed_workers
from risgd_hosts.live_cluster import lighthouse_command, wait_port
from risgd_hosts.local import free_port, run_ranks

ENGINE = os.path.join(os.path.dirname(__file__), os.pardir, "risgd_ext")


def test_the_floor_is_checked_once_under_one_name():
    """min_nodes is the membership's floor (risgd.min_nodes; the trainer's elastic.min_workers resolves into
    it); the caller's accept is asked only above it. torchft's side (LiveNodes) keeps no floor of its own."""
    m = Membership(parse_block({"min_nodes": 2}), 4)
    asked: list = []
    m.accept = lambda members: asked.append(sorted(members)) or ("too little data" if 3 not in members else None)
    assert "fewer than min_nodes=2" in m.below_floor(frozenset({0}))
    assert asked == []  # below min_nodes the caller is not asked again
    assert m.below_floor(frozenset({0, 1})) == "too little data" and m.below_floor(frozenset({1, 3})) is None
    assert asked == [[0, 1], [1, 3]]
    fields = set(LiveNodes.__dataclass_fields__)
    assert not fields & {"min_workers", "min_nodes", "floor_wait_s", "accept"}, fields


def test_who_is_live_is_the_schedule_less_the_quorum():
    """The membership decides who is live: the failure schedule's complement, of the quorum's nodes when
    there is one; the view is a frozen copy (changing its events changes nothing)."""
    cfg = parse_block({"failures": [{"ranks": [2], "start_round": 1, "end_round": 3}]})
    m = Membership(cfg, 4)
    assert m.live_of_round(0).workers == frozenset(range(4)) and m.live_of_round(1).down == {2}
    assert failed_workers(cfg, 2, 4) == {2} and m.live_of_round(1, frozenset({0, 2, 3})).workers == {0, 3}
    view = m.view(rounds=2)  # after 2 rounds: the last was round 1, worker 2 down
    assert view.live_workers == {0, 1, 3} and view.members == set(range(4)) and view.quorum_id is None
    assert m.view(rounds=0).live_workers == frozenset(range(4))


def test_the_quorum_id_is_recorded_from_torchfts_public_configure():
    """The quorum id comes from the group torchft configures (its process groups' public interface), not from
    the manager's private field; -1 before the first quorum, as torchft's own."""
    import datetime

    from torch.distributed import TCPStore

    pg = _reconfigurable_gloo(datetime.timedelta(seconds=10))
    assert pg.quorum_id == -1
    port = free_port()
    store = TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=10))
    pg.configure(f"127.0.0.1:{port}/torchft/7/0", "w0", 0, 1, quorum_id=7, global_ranks=[0])
    assert (pg.quorum_id, pg.rank, pg.world, pg.members) == (7, 0, 1, [0])
    del store
    for root, _, files in os.walk(ENGINE):  # and no private field of torchft's manager is read anywhere
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    assert "_quorum_id" not in f.read(), name


@pytest.mark.slow
def test_a_live_round_returns_its_report_and_the_view_is_torchfts_quorum(tmp_path):
    """A real lighthouse and manager, one node: the view's quorum id is the one torchft's manager holds; the
    membership's round returns its phases' reports and changes none of the controller's counters, which
    change when the controller adds the report up."""
    from tests.membership_workers import scenario_one_live_node

    port = free_port()
    lighthouse = subprocess.Popen(lighthouse_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, [], process=lighthouse)
        out = run_ranks(scenario_one_live_node, 1, f"http://127.0.0.1:{port}", timeout=180)[0]
    finally:
        lighthouse.kill()
        lighthouse.wait()
    assert out["view_quorum"] == out["current_quorum"] == out["torchft_quorum"] >= 0, out
    assert (out["members"], out["live_workers"], out["workers"], out["healing"]) == ([0], [0], 1, False)
    assert out["healed"] is False and out["rounds"] == 2 and out["view_frozen"]
    assert out["untouched"] and out["phases"] == 3 and not out["in_flight"], out
    assert out["report_bytes"] > 0 and out["accounted_bytes"] == out["report_bytes"], out


def test_the_trainer_words_the_engines_floor_in_its_recipe_keys_and_checks_coverage_alone():
    """The trainer checks no node count of its own (elastic.min_workers is the engine's min_nodes, checked
    there once); the one line a user of the trainer sees names the keys of the recipe, elastic.min_workers and
    elastic.floor_wait_s, and that the latest checkpoint is kept and the same commands resume."""
    from risgd_ext.live import BelowFloor
    from risgd_trainer.elastic import floor_error, stop_line

    cfg = {"elastic": {"min_workers": 2, "min_coverage": 0.5}}
    assert floor_error(cfg, [0], 1.0, 4) is None  # one node of 4 holding all the data: the engine's floor says
    assert "below elastic.min_coverage=0.5" in floor_error(cfg, [0, 1], 0.25, 4)
    m = Membership(parse_block({"min_nodes": 2, "floor_wait_s": 60}), 4)
    line = stop_line(BelowFloor(f"below the floor for floor_wait_s=60 s: {m.below_floor(frozenset({0}))}"))
    assert "fewer than elastic.min_workers=2" in line and "lower elastic.min_workers" in line, line
    assert "elastic.floor_wait_s=60 s" in line and "min_nodes" not in line and "\n" not in line, line
    assert "the latest checkpoint is kept: the same commands resume" in line, line
