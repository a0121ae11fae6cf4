"""Ctrl-C in the middle of a run, then the same command again: the run resumes (and says from which
step), its wandb record holds every step of metrics.jsonl (read back from the offline files), and the
interruption is one line on rank 0, no rank's traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from helpers import ROOT, clean_env, trainer_command

from risgd_trainer.tracking import read_offline_history

pytestmark = pytest.mark.slow  # `make quick` leaves these out (see pyproject's markers)


def _launch(tmp_path, digits_dir, log):
    cmd = trainer_command(["steps=300", "eval_every=25", "checkpoint_every=50", f"data.shards={digits_dir}",
                           f"runs_dir={tmp_path}", "run_name=r", "wandb.mode=offline", "dist_timeout_s=60"])
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=clean_env(WANDB_SILENT="true"),
                            start_new_session=True)


def test_ctrl_c_then_resume_keeps_the_wandb_history(tmp_path, digits_dir):
    metrics = tmp_path / "r" / "metrics.jsonl"
    first_log, second_log = open(tmp_path / "first.log", "w+"), open(tmp_path / "second.log", "w+")
    proc = _launch(tmp_path, digits_dir, first_log)
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    assert proc.wait(timeout=120) != 0
    assert not (tmp_path / "r" / "summary.json").exists()
    tag = (tmp_path / "r" / "checkpoints" / "latest").read_text().strip()
    first = (tmp_path / "first.log").read_text()
    said = [line for line in first.splitlines() if "interrupted:" in line]
    assert len(said) == 1 and f"resumes it from its checkpoint {tag}" in said[0], first[-3000:]
    # no rank prints a traceback; DeepSpeed's launcher (runner.py, waiting on its child) prints its own
    blocks = first.split("Traceback (most recent call last):")[1:]
    assert all("deepspeed/launcher/runner.py" in b and "\nKeyboardInterrupt" in b for b in blocks), first[-3000:]
    assert "gloo" not in first.lower() and "Connection" not in first, first[-3000:]
    proc = _launch(tmp_path, digits_dir, second_log)  # the same command: resumes from the checkpoint
    assert proc.wait(timeout=300) == 0
    assert f"r: resuming from step {tag[4:]} of 300" in (tmp_path / "second.log").read_text()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    history = read_offline_history(str(tmp_path / "r"), newest=True)
    assert len(os.listdir(tmp_path / "r" / "wandb")) >= 2  # the resumed part wrote its own offline directory
    assert [h["step"] for h in history] == [m["step"] for m in rows]  # every step, the interrupted part's too
    assert history[-1]["test_acc"] == rows[-1]["test_acc"]


def test_a_second_signal_while_stopping_is_noted_not_raised(monkeypatch):
    """Seen on a loaded machine: Ctrl-C reaches every process of the group and DeepSpeed's launcher
    forwards its own, so a rank can get a second SIGINT while it handles the first; raising again there
    printed a traceback instead of the one `interrupted:` line."""
    import signal as sig

    from risgd_trainer import train

    monkeypatch.setattr(train, "_INTERRUPTED", [])
    with pytest.raises(KeyboardInterrupt):
        train._on_interrupt(sig.SIGINT, None)
    try:
        train._on_interrupt(sig.SIGINT, None)  # while stopping: no second KeyboardInterrupt
    except KeyboardInterrupt:
        pytest.fail("a second signal raised KeyboardInterrupt again while the run was stopping")
    assert train._INTERRUPTED == [sig.SIGINT, sig.SIGINT]


def test_one_run_at_a_time_in_a_run_directory(tmp_path, digits_dir):
    """Two runs into one run directory both trained and corrupted the record (issue 46, item 1). A run holds
    its directory (an flock: a crash cannot leave it stale); a second one is refused in one line, exit 2,
    touching nothing; once the holder is gone (killed -9 here), the directory is free again (no stale lock)."""
    import sys

    from helpers import ROOT, clean_env

    run_dir = tmp_path / "runs" / "dup"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from risgd_trainer.run_lock import hold; "
                               f"hold({str(run_dir)!r}); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(os.listdir(run_dir))
        cmd = [sys.executable, "-m", "risgd_trainer.train", "--recipe", "recipes/digits.yaml", "algorithm=sync",
               "mu=0", "steps=20", "eval_every=20", f"runs_dir={tmp_path / 'runs'}", "run_name=dup",
               "wandb.enabled=false", f"data.shards={digits_dir}"]
        second = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
        lines = [line for line in second.stderr.splitlines() if line.startswith("error")]
        assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert lines[0] == (f"error: {run_dir} is in use by another run (process {holder.pid}): wait for it, stop it, "
                            "or pick a new run_name=")
        assert sorted(os.listdir(run_dir)) == before  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    from risgd_trainer import run_lock

    run_lock.hold(str(run_dir))  # the killed holder's lock went with it
    run_lock.release(str(run_dir))


def test_ranks_sharing_a_machine_share_its_cores_whoever_launched_them(tmp_path, monkeypatch):
    """Issue 46: two elastic nodes on one machine each took every core (17x slower unless OMP_NUM_THREADS=1): the
    deepspeed path divided the cores by its LOCAL_SIZE, the elastic path knew of no other node. Every trainer
    rank registers on the machine and takes cores // (ranks here); a dead rank's entry does not count; a set
    OMP_NUM_THREADS wins."""
    import sys

    import torch

    from risgd_trainer import threads

    monkeypatch.setattr(threads, "REGISTRY", str(tmp_path / "ranks"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    before = torch.get_num_threads()
    code = (f"import time; from risgd_trainer import threads; threads.REGISTRY = {str(tmp_path / 'ranks')!r}; "
            "threads.register(); print('in', flush=True); time.sleep(600)")
    others = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in others] == ["in", "in"]
        threads.register()
        assert threads.ranks_here() == 3 and threads.balance(cores=12) == 4 and torch.get_num_threads() == 4
        others[0].kill()
        others[0].wait()
        assert threads.ranks_here() == 2 and threads.balance(cores=12) == 6  # the dead one's cores come back
        monkeypatch.setenv("LOCAL_SIZE", "3")
        assert threads.balance(cores=12, shared=False) == 4  # a fixed launch: its own ranks only
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.balance(cores=12) is None
    finally:
        for p in others:
            p.kill()
            p.wait()
        torch.set_num_threads(before)
