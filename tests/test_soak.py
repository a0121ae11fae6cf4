"""200 averaging rounds of a tiny model on 4 ranks with random failures: all ranks identical after
every round, and resident memory flat."""

from __future__ import annotations

import pytest

from risgd_hosts.local import run_ranks
from tests.soak_worker import ROUNDS, soak

pytestmark = pytest.mark.slow  # `make quick` leaves these out (see pyproject's markers)


def test_soak_identical_ranks_and_flat_memory():
    results = run_ranks(soak, 4, timeout=600)
    for step in range(ROUNDS):
        assert len({r["digests"][step] for r in results}) == 1, f"ranks differ after round {step + 1}"
    live = results[0]["live"]
    assert 3 in live and 4 in live, "the failure schedule should take a rank down in some rounds"
    assert sum(r["stats"]["rounds_down"] for r in results) == live.count(3)
    for r in results:
        assert r["stats"]["rounds"] == ROUNDS
        assert r["rss"][ROUNDS] <= 1.10 * r["rss"][20], f"resident memory grew: {r['rss']}"
