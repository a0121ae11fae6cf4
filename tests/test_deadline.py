"""The round's deadline (risgd_ext.deadline): a slow worker is left out of a round when the others cover the
data, on a real gloo group with a worker that really is slower; the vote's rules; the keys' refusals. What a late
worker's round must produce is checked against the reference in the composition matrix (tests/test_reference.py,
fault "late")."""

from __future__ import annotations

import pytest
import torch

from risgd_ext.config import ConfigError, parse_block
from risgd_ext.deadline import Deadline


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_deadline_is_the_margin_over_the_median_of_recent_rounds():
    d = Deadline(0.25, workers=1, worker=0)
    clock = d.clock = Clock()
    assert d.deadline is None and not d.late_now(1, 3)  # no round yet: no deadline
    d.step_started()
    clock.now = 4.0
    vote = d.vote(False, 4, 4, torch.device("cpu"))  # alone (no group): its own seconds
    assert vote.late == frozenset() and vote.deadline is None
    d.round_done()
    assert d.deadline == pytest.approx(5.0)
    d.step_started()
    clock.now = 4.0 + 3.0  # 3 s for 1 step: the next would end at 6 s, past 5 s
    assert d.late_now(1, 3)
    assert not d.late_now(1, 0)  # the round's last step votes at the round anyway
    clock.now = 4.0 + 2.0  # 2 s for 1 step: 4 s after the next, within
    assert not d.late_now(1, 3)


def test_late_workers_skip_only_when_the_others_are_accepted():
    d = Deadline(0.1, workers=1, worker=0)
    d.clock = Clock()
    d.history.append(1.0)
    d.accept = lambda on_time: None
    assert d.vote(True, 1, 4, torch.device("cpu")).refused == "every worker was late"  # nobody on time
    assert not d.skipping
    d.round_done()
    d2 = Deadline(0.1, workers=2, worker=0)
    d2.clock = Clock()
    d2.step_started()
    d2.clock.now = 2.0  # 1 step in 2 s: 8 s for the round, against the other's 0
    vote = d2.vote(True, 1, 4, torch.device("cpu"), members=frozenset({0, 1}))  # worker 1 on time, accepted
    assert vote.skip and d2.skipping
    d3 = Deadline(0.1, workers=2, worker=0)
    d3.clock = Clock()
    d3.step_started()
    d3.clock.now = 2.0
    d3.accept = lambda on_time: "too little data"
    vote = d3.vote(True, 1, 4, torch.device("cpu"), members=frozenset({0, 1}))
    assert not vote.skip and not d3.skipping and vote.refused == "too little data"


def test_only_the_slowest_late_workers_are_left_out_when_the_rest_would_not_cover_the_data():
    """Every rank decides from the vote alone: the late are added back, least late first, while the kept are not
    accepted or the next is within the margin of the round's median pace; the rest are left out. Here the check
    wants 3 of 4 workers: of the late 0 (3.7 s) and 3 (11 s), 0 is waited for and 3 left out; with everyone late
    (a slow round), only the straggler is left out."""
    d = Deadline(0.1, workers=4, worker=0)
    d.accept = lambda kept: None if len(kept) >= 3 else f"{len(kept)} of 4"
    times = (3.7, 2.9, 2.8, 11.0)  # median 3.3: the margin's limit 3.63
    assert d.leave_out(frozenset({0, 3}), times) == (frozenset({3}), "2 of 4")
    assert d.leave_out(frozenset({0, 1, 2, 3}), times) == (frozenset({3}), "2 of 4")
    assert d.leave_out(frozenset({3}), times) == (frozenset({3}), None)
    assert d.leave_out(frozenset(), times) == (frozenset(), None)
    d.accept = lambda kept: "never"  # nothing is ever accepted: everyone is waited for
    assert d.leave_out(frozenset({3}), times) == (frozenset(), "never")
    d.accept = None  # the engine alone (no data check)
    assert d.leave_out(frozenset({0, 3}), times) == (frozenset({0, 3}), None)  # 0 is past the margin too
    assert d.leave_out(frozenset({0, 3}), (3.5, 2.9, 2.8, 11.0)) == (frozenset({3}), None)  # 0 within it
    assert d.leave_out(frozenset({3}), times, members=frozenset({1, 3})) == (frozenset({3}), None)


@pytest.mark.parametrize("block, words", [
    ({"deadline_margin": -0.1}, "deadline_margin"),
    ({"deadline_margin": 0.1, "node_size": 2}, "not supported with node_size > 1"),
    ({"deadline_margin": 0.1, "fault_tolerance": "torchft"}, "not supported with fault_tolerance=torchft"),
    ({"deadline_margin": 0.1, "overlap": True, "compress": "int8"}, "not supported with overlap and compress=int8"),
])
def test_bad_deadline_keys_are_refused_in_one_line(block, words):
    with pytest.raises(ConfigError, match=words) as e:
        parse_block(block)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_slow_worker_is_left_out_when_the_others_cover_it_and_waited_for_when_not():
    """3 ranks of a real gloo group, every step 0.05 s long and rank 2's 0.25 s (a fifth of the pace). With the
    deadline the fast ranks stop waiting for its whole round: it is late in most rounds, skips the rest of them, and
    takes the average (every rank ends on one model). When the check refuses (the others would not cover its data),
    the rounds wait for it as they would without a deadline."""
    from risgd_hosts.local import run_ranks
    from tests.deadline_workers import ROUNDS, SLOW, TAU, slow_worker

    left = run_ranks(slow_worker, 3, 0.5, False, 0.2, timeout=240)
    waited = run_ranks(slow_worker, 3, 0.5, True, 0.2, timeout=240)
    for results in (left, waited):
        assert all(torch.equal(r["model"], results[0]["model"]) for r in results)  # one model after consensus
        assert all(r["stats"]["rounds"] == ROUNDS and r["stats"]["steps"] == TAU * ROUNDS for r in results)
    slow = left[SLOW]
    # round 0 has no deadline; from round 1 on the slow worker is late (its 1st step alone takes longer than the
    # fast ones' round plus half)
    assert slow["stats"]["late_rounds_here"] >= ROUNDS - 2, slow["stats"]
    assert left[0]["stats"]["late_rounds"] == slow["stats"]["late_rounds_here"]  # every rank saw the same votes
    assert left[0]["stats"]["late_rounds_here"] == 0 and left[0]["skipped_at"] == []
    assert slow["stats"]["steps_skipped"] == len(slow["skipped_at"]) >= 2 * (ROUNDS - 2)
    assert all(e["left_out_workers"] == [SLOW] for e in left[0]["events"])
    w = waited[SLOW]
    assert w["stats"]["late_rounds_here"] == 0 and w["skipped_at"] == [] and w["stats"]["late_waited"] >= ROUNDS - 2
    assert all(not e["left_out"] and "do not cover" in e["waited_because"] for e in waited[0]["events"])
    # the fast ranks' run took a fraction of the one that waited for every step of the slow worker
    assert left[0]["wall"] < 0.7 * waited[0]["wall"], (left[0]["wall"], waited[0]["wall"])


def _rank_process(launcher_pid: int, local_rank: int, timeout: float = 120.0):
    """The process of ``local_rank`` among the launcher's descendants (its LOCAL_RANK in its environment)."""
    import time

    import psutil

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for child in psutil.Process(launcher_pid).children(recursive=True):
            try:
                env = child.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if env.get("LOCAL_RANK") == str(local_rank) and "train.py" in " ".join(child.cmdline()):
                return child
        time.sleep(0.5)
    raise AssertionError(f"no rank {local_rank} under the launcher within {timeout:.0f} s")


@pytest.mark.slow
def test_the_trainer_leaves_a_slow_rank_behind_and_records_it(tmp_path, digits_dir):
    """A real 2-rank launch of train.py (RI-SGD mu=0.5: each worker holds both chunks), rank 1 held to about a
    third of its pace from outside (stopped 2/3 of every 150 ms, as a CPU quota would): rounds close without it,
    the record has each such round, the summary counts them by worker, both ranks end on one model."""
    import json
    import os
    import signal
    import subprocess
    import threading

    from helpers import ROOT, clean_env, trainer_command

    runs = tmp_path / "runs"
    cmd = trainer_command(["algorithm=risgd", "mu=0.5", "tau=5", "steps=60", "eval_every=0", "deadline_margin=0.2",
                           "run_name=dl", f"data.shards={digits_dir}", f"runs_dir={runs}", "wandb.enabled=false"], 2)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env())
    slow = _rank_process(proc.pid, 1)
    done = threading.Event()

    def duty_cycle():
        while not done.is_set():
            try:
                os.kill(slow.pid, signal.SIGSTOP)
                done.wait(0.10)
                os.kill(slow.pid, signal.SIGCONT)
            except ProcessLookupError:
                return
            done.wait(0.05)

    thread = threading.Thread(target=duty_cycle, daemon=True)
    thread.start()
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        done.set()
        thread.join()
        try:
            os.kill(slow.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((runs / "dl" / "summary.json").read_text())
    assert summary["late_rounds"] >= 3 and summary["late_by_worker"]["1"] >= 3 and summary["late_by_worker"]["0"] == 0
    assert len(set(summary["rank_model_sha256"])) == 1  # one model on both ranks
    events = [json.loads(line) for line in (runs / "dl" / "metrics.jsonl").read_text().splitlines()
              if '"event": "late"' in line]
    assert len(events) == summary["late_rounds"] + summary["late_waited"]
    assert all(e["left_out_workers"] == [1] and e["deadline_s"] > 0 for e in events)
    assert "round deadline (deadline_margin=0.2)" in out and "rounds left out, by worker: {'1':" in out
