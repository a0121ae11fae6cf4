"""The training loop as an object (issue 45 item 1): ``Trainer(run).fit()`` calls named steps, each of which
works on its own, and the elastic strategy takes and returns typed values (no shared dict, no tuples)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, clean_env

from risgd_trainer import elastic
from risgd_trainer import train as train_module
from risgd_trainer.checkpoints import Progress
from risgd_trainer.run_config import resolve_run


def test_the_loop_is_the_trainers_named_steps():
    """``train()`` is gone: main() runs ``Trainer(run).fit()``, whose steps are methods of their own."""
    assert not hasattr(train_module, "train")
    for step in ("set_up", "join", "open", "batch", "train_step", "aftermath", "evaluation_due", "evaluate",
                 "checkpoint_due", "checkpoint", "finish", "summary", "resume", "standing"):
        assert callable(getattr(train_module.Trainer, step, None)), step


def test_a_fixed_runs_strategy_takes_and_returns_values(digits_dir, tmp_path):
    """A fixed run's nodes: join() calls resume() once and returns no heal; a round's aftermath returns an
    AfterStep holding the tracker it was given, nothing to restart."""
    run = resolve_run("recipes/digits.yaml", [f"data.shards={digits_dir}", f"runs_dir={tmp_path}", "mu=0",
                                              "algorithm=sync"], 1)
    nodes = elastic.nodes_for(run, {"workers": 1}, {}, 0)
    resumed: list[int] = []
    assert nodes.join(None, lambda: resumed.append(1), Progress) is None and resumed == [1]
    tracker = object()
    after = nodes.after_step(None, 7, tracker, 0)
    assert isinstance(after, elastic.AfterStep) and after.tracker is tracker
    assert after.restart is None and after.healed is None


def test_a_heal_hands_the_trainers_progress_over_as_a_value(digits_dir, tmp_path):
    """What a live peer sends a joiner (its trainer's progress, in the wire's form) comes back on the joiner
    as the same Progress at the step it was healed to, schedule included."""
    run = resolve_run("recipes/digits.yaml", [f"data.shards={digits_dir}", f"runs_dir={tmp_path}", "mu=0",
                                              "algorithm=sync"], 1)
    peer, joiner = (elastic.ElasticNodes(run, {"workers": 2}, {}, w) for w in (0, 1))
    theirs = Progress(step=40, best=71.5, last_eval=30, wall=12.5, scheduler={"last_epoch": 40})
    peer._standing = lambda: theirs
    joiner._healed.update(peer._trainer_state())
    assert joiner._take_healed(40) == theirs


@pytest.mark.slow
def test_the_checkpoint_step_alone_resumes_the_run_bit_for_bit(digits_dir, tmp_path):
    """A Trainer driven through its named steps, stopped at step 5 by its checkpoint step alone: a new Trainer on
    the same run directory stands where it stopped (step, best accuracy, last evaluation, data cursor, schedule,
    model), and goes on to the same final model as the run trained in one fit()."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "trainer_workers.py"), digits_dir,
                           str(tmp_path / "runs"), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    stopped, resumed = seen["stopped"], seen["resumed"]
    assert stopped["step"] == 5 and stopped["last_eval"] == 3 and stopped["cursor"] is not None
    assert resumed == stopped, (resumed, stopped)
    assert [c for c in seen["checkpoints"] if c.startswith("step")] == ["step5", "step8"]
    with open(tmp_path / "runs" / "split" / "summary.json") as f:
        split = json.load(f)
    with open(tmp_path / "runs" / "whole" / "summary.json") as f:
        whole = json.load(f)
    assert split["steps"] == whole["steps"] == 8
    assert split["model_sha256"] == whole["model_sha256"]
    assert split["best_test_acc"] == whole["best_test_acc"] and split["final_test_acc"] == whole["final_test_acc"]
