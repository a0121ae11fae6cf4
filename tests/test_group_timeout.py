"""A peer that goes silent (a power cut: its link down, no reset) fails the next round after the
timeout the process group was started with, not after torch's 30-minute default for new groups.

DeepSpeed's data-parallel group is made by ``new_group`` without a timeout; the engine gives it
the world's, so that an elastic agent can restart the survivors. Real DeepSpeed engines, a real
2-rank gloo group.
"""

from __future__ import annotations

import pytest

from risgd_hosts.local import run_ranks
from tests.engine_workers import scenario_silent_peer

pytestmark = pytest.mark.slow  # `make quick` leaves these out (see pyproject's markers)

TIMEOUT_S = 3.0


def test_a_silent_peer_fails_the_round_after_the_worlds_timeout():
    r0, r1 = run_ranks(scenario_silent_peer, 2, TIMEOUT_S, timeout=180)
    assert not r0["same_group"]  # the data-parallel group is its own group, made by new_group
    assert r0["world_timeout_s"] == TIMEOUT_S
    assert r0["group_timeout_s"] == r1["group_timeout_s"] == TIMEOUT_S  # torch alone would give 1800
    assert r0["error"] is not None, "the round did not fail"
    assert TIMEOUT_S * 0.5 < r0["failed_after_s"] < TIMEOUT_S + 15, r0
