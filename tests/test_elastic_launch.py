"""A lost node does not stop training: real torchrun agents (one per "node", loopback), digits,
RI-SGD mu=0.5 on 3 workers; one agent's whole node is killed mid-run, the survivors restart at 2
workers from the last checkpoint with coverage 1.0 and train on; the node comes back, rejoins and
the run ends at 3 workers again (one run for both). And the refusals, each one line and
exit 2: two ranks claiming one worker, a replica of no slot, live workers below the floor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from risgd_hosts.elastic_local import kill_node, prepare_replicas, start_agent
from risgd_hosts.local import free_port

pytestmark = pytest.mark.slow  # `make quick` leaves these out (see pyproject's markers)

COMMON = ["--recipe", "recipes/digits.yaml", "algorithm=risgd", "mu=0.5", "tau=10", "eval_every=100",
          "checkpoint_every=50", "wandb.enabled=false", "elastic.workers=3", "dist_timeout_s=60"]


@pytest.fixture(scope="module")
def replicas(digits_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("replicas"))
    return prepare_replicas(digits_dir, out, workers=3, mu=0.5, partition="label_sorted")


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _beat_step(run_dir: str, worker: int) -> int:
    try:
        with open(os.path.join(run_dir, "elastic", f"beat-w{worker:05d}.json")) as f:
            return json.load(f)["step"]
    except (OSError, ValueError):
        return -1


def _generations(run_dir: str) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "elastic", "membership.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def test_a_killed_node_leaves_the_run_to_the_survivors_and_rejoins(replicas, tmp_path):
    """One run (folded: the loss and the rejoin shared one launch's start-up): worker 2's whole node is
    killed mid-run; the survivors restart at 2 workers from the last checkpoint with coverage 1.0, each
    saying so in one line; the node comes back, rejoins at the next rendezvous and the run ends at 3."""
    manifest, dirs = replicas
    args = [*COMMON, "steps=1500", f"data.manifest={manifest}", f"runs_dir={tmp_path}", "run_name=re"]
    port, run_dir = free_port(), os.path.join(tmp_path, "re")
    agents = [start_agent(k, dirs[k], port, args, str(tmp_path), nnodes="2:3") for k in range(3)]
    phase, deadline, killed_at = "kill", time.monotonic() + 450, None
    try:
        while any(a.poll() is None for a in agents[:2]) and time.monotonic() < deadline:
            time.sleep(0.3)
            if phase == "kill" and _beat_step(run_dir, 2) >= 160:  # past the checkpoints at 50..150: mid-run
                kill_node(agents[2])  # the node serving worker 2, agent and worker at once
                killed_at, phase = time.time(), "wait"
            elif phase == "wait" and len(gens := _generations(run_dir)) == 2 and _beat_step(run_dir, 0) >= \
                    gens[1]["step"] + 60:  # the survivors train on at 2 workers: bring the node back
                os.replace(os.path.join(tmp_path, "agent2.log"), os.path.join(tmp_path, "agent2-killed.log"))
                until_back = [os.path.getsize(os.path.join(tmp_path, f"agent{k}.log")) for k in range(2)]
                agents[2] = start_agent(2, dirs[2], port, args, str(tmp_path), nnodes="2:3")
                phase = "back"
        assert agents[2].wait(timeout=max(deadline - time.monotonic(), 1)) == 0
    finally:
        for a in agents:
            if a.poll() is None:
                kill_node(a)
    logs = "".join(open(os.path.join(tmp_path, f"agent{k}.log")).read()[-3000:] for k in range(3))
    assert phase == "back" and [a.returncode for a in agents] == [0, 0, 0], logs
    line = "elastic: a peer of this rank's collective is gone"
    for k in range(2):  # the loss, handled, is one line on each survivor: no traceback, no C++ frames before it
        survivor = open(os.path.join(tmp_path, f"agent{k}.log")).read()[:until_back[k]]
        assert survivor.count(line) == 1 and "Traceback" not in survivor, survivor[-4000:]
        # (torch's own C++ warnings of the restart that follows, e.g. a slow store connect, are torch's)
        assert "frame #" not in survivor[:survivor.index(line)], survivor[-4000:]
    rows = _rows(run_dir)
    events = [r for r in rows if r.get("event") == "membership"]
    assert [e["live_workers"] for e in events] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    lost, back = events[1], events[2]
    assert lost["lost_workers"] == [2] and lost["world_size"] == 2
    assert lost["data_coverage"] == 1.0  # cyclic mu=0.5: worker 2's chunks are all on workers 0 and 1
    assert lost["step"] % 50 == 0 and 150 <= lost["step"] <= 200  # the last checkpoint before the kill
    # measured from worker 2's last heartbeat (every half second, so just before the kill) to the first step
    assert -0.5 < killed_at - lost["failed_at"] < 3
    assert lost["seconds_from_failure_to_step"] == pytest.approx(lost["first_step_at"] - lost["failed_at"])
    assert 0 < lost["seconds_from_failure_to_step"] < 120 and lost["steps_redone"] > 0
    evals = [r for r in rows if "event" not in r]
    assert [r["step"] for r in evals] == list(range(100, 1501, 100))
    assert all(r["live_ranks"] == 2 for r in evals if lost["step"] < r["step"] < back["step"])
    assert all(r["data_coverage"] == 1.0 for r in evals)
    assert back["joined_workers"] == [2] and back["data_coverage"] == 1.0
    # worker 2 had no state in the checkpoints written at 2 workers: it starts from the average
    assert back["restored"] == {"0": "own", "1": "own", "2": "average"}
    assert back["step"] > lost["step"] and back["step"] % 50 == 0
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["restarts"] == 2 and summary["world_sizes"] == [3, 2, 3] and summary["live_workers"] == [0, 1, 2]
    assert summary["elastic_workers"] == 3 and summary["steps"] == 1500 and summary["min_data_coverage"] == 1.0
    assert summary["rank_model_sha256"] == [summary["model_sha256"]] * 3
    assert summary["final_test_acc"] > 90 and 0 < summary["goodput"] < 1
    print(f"kill to the first step on the survivors: {lost['seconds_from_failure_to_step']:.1f} s; "
          f"rejoin: {back['seconds_from_failure_to_step']:.1f} s from the survivors' stop to the first step at 3")


def _single(args: list[str], replica: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """One process, a world of 1 (the launcher's variables set by hand), serving ``replica``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(RISGD_REPLICA_DIR=replica, OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_live_workers_below_the_floor_stop_with_one_line(replicas, tmp_path):
    manifest, dirs = replicas
    proc = _single([*COMMON, "steps=20", f"data.manifest={manifest}", f"runs_dir={tmp_path}"], dirs[0])
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = _error_lines(proc)
    assert "elastic run stopped: the 1 live workers [0] hold 83." in line  # chunks 0, 1 and half of 2
    assert "% of the training set, below elastic.min_coverage=1;" in line and "worker(s) [1, 2]" in line


def test_a_replica_of_no_slot_is_refused_in_one_line(replicas, digits_dir, tmp_path):
    manifest, _ = replicas
    _, other = prepare_replicas(digits_dir, str(tmp_path / "other"), workers=4, mu=0.25)  # another manifest
    proc = _single([*COMMON, "steps=20", f"data.manifest={manifest}", f"runs_dir={tmp_path}"], other[3])
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = _error_lines(proc)
    assert "holds worker(s) [3] of 4, which belong to no slot of this run's 3-worker manifest" in line


def test_two_ranks_claiming_one_worker_are_refused_in_one_line(replicas, tmp_path):
    manifest, dirs = replicas
    args = [*COMMON, "steps=20", f"data.manifest={manifest}", f"runs_dir={tmp_path}", "elastic.min_coverage=0"]
    port = free_port()
    agents = [start_agent(k, dirs[1], port, args, str(tmp_path), nnodes="2", max_restarts=0) for k in range(2)]
    for a in agents:
        a.wait(timeout=300)
    logs = [open(os.path.join(tmp_path, f"agent{k}.log")).read() for k in range(2)]
    assert [a.returncode for a in agents] == [2, 2], logs
    for log in logs:  # each node says it once, as its last line
        lines = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "ranks 0 and 1 both serve manifest worker 1" in lines[0], logs
        assert log.rstrip().endswith(lines[0])


def _error_lines_of(log_path: str) -> list[str]:
    with open(log_path) as f:
        return [line for line in f.read().splitlines() if line.startswith("error:")]


def test_below_the_floor_under_the_launcher_is_one_line_however_often_torchrun_restarts(replicas, tmp_path):
    manifest, dirs = replicas
    args = [*COMMON, "steps=20", f"data.manifest={manifest}", f"runs_dir={tmp_path}"]
    agent = start_agent(0, dirs[0], free_port(), args, str(tmp_path), nnodes="1:3", max_restarts=1)
    assert agent.wait(timeout=300) == 2
    (line,) = _error_lines_of(os.path.join(tmp_path, "agent0.log"))
    assert "elastic run stopped: the 1 live workers [0] hold 83." in line
    # torchrun did restart it: two trainers failed with exit status 2
    assert open(os.path.join(tmp_path, "agent0.log")).read().count("failed (exitcode: 2)") == 2


def test_fewer_than_min_nodes_is_one_line_and_exit_1(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "risgd_tools.elastic_launch", "--nnodes=2:3", "--nproc-per-node=1",
                           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=lonely",
                           "--rdzv-conf=join_timeout=2", "--", "--recipe", "digits"],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "fewer than 2 node(s) (the MIN of --nnodes=2:3) joined within join_timeout=2 s" in line


def test_the_launcher_refuses_a_command_without_the_separator_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "risgd_tools.elastic_launch", "--nnodes=2", "train.py"],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "after '--'" in proc.stderr


def test_losing_the_rendezvous_host_is_one_line_and_the_run_resumes_on_a_new_endpoint(replicas, tmp_path):
    manifest, dirs = replicas
    args = [*COMMON, "steps=300", "elastic.min_coverage=0", f"data.manifest={manifest}", f"runs_dir={tmp_path}",
            "run_name=hl"]
    run_dir, port = os.path.join(tmp_path, "hl"), free_port()
    agents = [start_agent(k, dirs[k], port, args, str(tmp_path), nnodes="1:2") for k in range(2)]
    deadline = time.monotonic() + 300
    try:
        while _beat_step(run_dir, 1) < 60 and agents[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
        kill_node(agents[0])  # the node hosting the c10d store, past the checkpoint at step 50
        assert agents[1].wait(timeout=200) == 1
    finally:
        for a in agents:
            if a.poll() is None:
                kill_node(a)
    log = os.path.join(tmp_path, "agent1.log")
    (line,) = _error_lines_of(log)
    assert "the rendezvous host 127.0.0.1:" in line and "cannot be reached" in line, open(log).read()[-3000:]
    # the same command on the surviving node, with the rendezvous on it now: the run resumes
    again = start_agent(0, dirs[1], free_port(), args, str(tmp_path), nnodes="1:2")
    assert again.wait(timeout=300) == 0, open(os.path.join(tmp_path, "agent0.log")).read()[-3000:]
    events = [r for r in _rows(run_dir) if r.get("event") == "membership"]
    assert [e["live_workers"] for e in events] == [[0, 1], [1]] and events[1]["step"] >= 50
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["steps"] == 300
