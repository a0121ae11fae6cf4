"""kill -9 of one rank mid-run: the job stops promptly, and re-running the same command resumes from
the latest complete checkpoint and ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import time

import pytest
from helpers import launch_trainer

pytestmark = pytest.mark.slow  # `make quick` leaves these out (see pyproject's markers)

FAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults")  # the kill -9 hook (sitecustomize)


def _summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def test_kill9_then_rerun_resumes_bitwise(tmp_path, digits_dir):
    """One launch (a plan: the uninterrupted reference, then the run that is killed) and the same command
    again: the reference is finished and skipped, the killed run resumes from its latest checkpoint."""
    common = ["algorithm=risgd", "mu=0.5", "steps=40", "tau=5", "eval_every=10", "checkpoint_every=10",
              f"data.shards={digits_dir}", f"runs_dir={tmp_path}", "wandb.enabled=false", "dist_timeout_s=60"]
    plan = [["run_name=straight"], ["run_name=crashed"]]
    t0 = time.monotonic()
    # the hook counts the process's optimizer steps: the reference's 40, then the crashed run's 25th
    killed = launch_trainer(common, plan=plan, plan_dir=str(tmp_path),
                            env_extra={"RISGD_TEST_KILL_AT_STEP": str(40 + 25), "PYTHONPATH": FAULTS})
    stopped_after = time.monotonic() - t0
    assert killed.returncode != 0
    assert stopped_after < 120, f"the job took {stopped_after:.0f}s to stop after a rank died"
    assert os.path.exists(os.path.join(tmp_path, "straight", "summary.json")), killed.stderr[-3000:]
    run_dir = os.path.join(tmp_path, "crashed")
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        assert f.read() == "step20"  # the latest complete checkpoint before the kill at step 25

    resumed = launch_trainer(common, plan=plan, plan_dir=str(tmp_path))  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _summary(run_dir)["model_sha256"] == _summary(os.path.join(tmp_path, "straight"))["model_sha256"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [10, 20, 30, 40]
