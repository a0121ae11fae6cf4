"""Ctrl-C in the middle of a run, then the same command again: the run resumes, and its wandb
record holds every step of metrics.jsonl (read back from the offline files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from risgd_hosts.local import free_port
from risgd_recipes.tracking import read_offline_history

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(tmp_path, digits_dir):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "train.py"), "--recipe", "recipes/digits.yaml", "steps=300", "eval_every=25",
           "checkpoint_every=50", f"data.shards={digits_dir}", f"runs_dir={tmp_path}", "run_name=r",
           "wandb.mode=offline", "dist_timeout_s=60"]
    env = dict(os.environ, WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)


def test_ctrl_c_then_resume_keeps_the_wandb_history(tmp_path, digits_dir):
    metrics = tmp_path / "r" / "metrics.jsonl"
    proc = _launch(tmp_path, digits_dir)
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    assert proc.wait(timeout=120) != 0
    assert not (tmp_path / "r" / "summary.json").exists()
    assert (tmp_path / "r" / "checkpoints" / "latest").exists()
    proc = _launch(tmp_path, digits_dir)  # the same command: resumes from the checkpoint
    assert proc.wait(timeout=300) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    history = read_offline_history(str(tmp_path / "r"), newest=True)
    assert len(os.listdir(tmp_path / "r" / "wandb")) >= 2  # the resumed part wrote its own offline directory
    assert [h["step"] for h in history] == [m["step"] for m in rows]  # every step, the interrupted part's too
    assert history[-1]["test_acc"] == rows[-1]["test_acc"]
