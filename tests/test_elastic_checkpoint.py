"""Checkpoints of an elastic run load at another world size: state keyed by manifest worker.

Written at 4 workers, loaded at 3 (workers 0, 1, 3: worker 2 is lost), then at 4 again: every
worker with state gets its model, momentum, counters and RNG back; the worker without state
(2, absent from the 3-worker checkpoint but for a stale file of another timeline) starts from the
average with fresh optimizer state.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from risgd_hosts.local import run_ranks
from tests.elastic_workers import scenario_phase

pytestmark = pytest.mark.slow  # `make quick` leaves these out (see pyproject's markers)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_written_at_4_workers_loads_at_3_and_then_at_4(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    four = run_ranks(scenario_phase, 4, [0, 1, 2, 3], ckpt, False, "at4", timeout=300)
    assert {f"risgd_worker{w:05d}.pt" for w in range(4)} <= set(os.listdir(os.path.join(ckpt, "at4")))
    assert all(_equal(r["saved_model"], four[0]["saved_model"]) for r in four)  # saved at an average

    survivors = [0, 1, 3]
    three = run_ranks(scenario_phase, 3, survivors, ckpt, True, "at3", "mid3", timeout=300)
    for r in three:
        before = four[r["worker"]]
        assert r["restored"] == "own" and r["steps"] == before["saved_steps"]
        assert _equal(r["model"], before["saved_model"])
        assert all(torch.equal(a, b) for a, b in zip(r["momentum"], before["saved_momentum"]))
        assert r["momentum"] and torch.equal(r["rng"], before["rng_at_save"])
        assert r["live_ranks"] == 3  # the rounds averaged over the 3 live workers
    assert all(_equal(r["saved_model"], three[0]["saved_model"]) for r in three)
    assert not _equal(three[0]["saved_model"], four[0]["saved_model"])  # it trained on

    # a stale file of worker 2 in the 3-worker checkpoint (as a node lost after writing stepN, before `latest` moved,
    # leaves when the run writes stepN again from an earlier checkpoint): stamped with another timeline, it is not
    # taken as worker 2's own state; worker 2 starts from the average as without a file
    shutil.copy(os.path.join(ckpt, "at4", "risgd_worker00002.pt"), os.path.join(ckpt, "at3"))
    again = run_ranks(scenario_phase, 4, [0, 1, 2, 3], ckpt, True, "back4", timeout=300)
    by_worker = {r["worker"]: r for r in three}
    for r in again:
        assert _equal(r["model"], three[0]["saved_model"])  # every worker starts from the average
        assert r["steps"] == three[0]["saved_steps"]
        if r["worker"] in by_worker:
            assert r["restored"] == "own"
            assert all(torch.equal(a, b) for a, b in zip(r["momentum"], by_worker[r["worker"]]["saved_momentum"]))
        else:
            assert r["restored"] == "average" and r["momentum"] == []  # fresh optimizer state
    assert all(_equal(r["saved_model"], again[0]["saved_model"]) for r in again)
    assert again[0]["live_ranks"] == 4

    # a checkpoint written inside a round holds no average for a worker without state: refused
    with pytest.raises(Exception, match="mid3 was written inside a round, so it holds no averaged model for "
                                           "worker 2"):
        run_ranks(scenario_phase, 4, [0, 1, 2, 3], ckpt, "mid3", "unused", timeout=300)
