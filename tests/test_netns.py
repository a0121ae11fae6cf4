"""Multi-node runs across real network namespaces: 2 test hosts x 2 ranks on tbf-shaped veth links,
each host with its own replicated data, launched by the stock deepspeed launcher (--no_ssh).

The launches need root and `ip netns` (skipped with the reason otherwise); the command line, its
invocations and its refusal of bad input are checked everywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from risgd_data.index import load_index
from risgd_data.manifest import build_manifest, load_manifest, write_manifest
from risgd_data.replicate import node_ranks
from risgd_hosts.netns_cluster import (
    ClusterInputError,
    check_inputs,
    manifest_ranks_per_node,
    netns_available,
    tbf_args,
)

pytestmark = [pytest.mark.slow, pytest.mark.netns]  # `make quick` leaves these out (see pyproject's markers)

WHY = netns_available()
needs_netns = pytest.mark.skipif(WHY is not None, reason=f"network namespaces unavailable: {WHY}")


def _namespaces(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"risgd{pid}-")]


def _cluster(args: list[str], work_dir: str, module: str = "hosts.netns_cluster", cwd: str = ROOT) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.Popen([sys.executable, "-m", module, "--work-dir", work_dir, *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("module", ["hosts.netns_cluster", "recipes.netns_cluster"])
def test_help_under_the_new_name_and_the_old_alias(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m hosts.netns_cluster" in proc.stdout and "recipes.netns_cluster" in proc.stdout


@pytest.mark.parametrize("case", ["no_hosts", "hosts_out_of_range", "unknown_option", "no_command",
                                  "manifest_without_source", "missing_manifest", "missing_source",
                                  "manifest_for_other_ranks", "cpus_not_numbers", "cpus_for_other_hosts"])
def test_bad_input_exits_2_with_one_line_before_building(tmp_path, digits_dir, case):
    manifest = str(tmp_path / "m.yaml")
    write_manifest(build_manifest(load_index(digits_dir), 4, 0.5, partition="label_sorted", seed=0), manifest)
    cmd = ["--", "train.py"]
    args = {"no_hosts": cmd,
            "hosts_out_of_range": ["--hosts", "201", *cmd],
            "unknown_option": ["--hosts", "2", "--no-such-option", *cmd],
            "no_command": ["--hosts", "2"],
            "manifest_without_source": ["--hosts", "2", "--manifest", manifest, *cmd],
            "missing_manifest": ["--hosts", "2", "--manifest", str(tmp_path / "none.yaml"), "--source", digits_dir,
                                 *cmd],
            "missing_source": ["--hosts", "2", "--manifest", manifest, "--source", str(tmp_path / "none"), *cmd],
            "manifest_for_other_ranks": ["--hosts", "3", "--manifest", manifest, "--source", digits_dir, *cmd],
            "cpus_not_numbers": ["--hosts", "2", "--cpus", "half", *cmd],
            "cpus_for_other_hosts": ["--hosts", "2", "--cpus", "0.5,0.5,0.2", *cmd]}[case]
    # Installed name, from another directory: what a user outside the repository runs.
    proc = _cluster(args, str(tmp_path / "cluster"), module="risgd_hosts.netns_cluster", cwd=str(tmp_path))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert not os.path.exists(tmp_path / "cluster")  # refused before anything was built
    if WHY is None:
        assert _namespaces(proc.pid) == []


@pytest.mark.parametrize("workers,hosts,ranks,ok", [
    (4, 2, 2, True),    # per-rank manifest: hosts x ranks-per-host workers
    (2, 2, 2, True),    # node-level manifest: one worker per host
    (3, 3, 1, True),    # both forms at once (one rank per host)
    (2, 2, 3, True),
    (3, 2, 2, False),
    (8, 2, 2, False),
    (1, 2, 2, False),
])
def test_check_inputs_accepts_per_rank_and_node_level_manifests(tmp_path, digits_dir, workers, hosts, ranks, ok):
    manifest = str(tmp_path / "m.yaml")
    write_manifest(build_manifest(load_index(digits_dir), workers, 0.0, partition="label_sorted", seed=0), manifest)
    if ok:
        check_inputs(hosts, ranks, None, manifest, digits_dir, None)
        per_node = manifest_ranks_per_node(workers, hosts, ranks)
        # What replicate_data passes as --ranks-per-node: every worker served, by exactly one host.
        served = [node_ranks(load_manifest(manifest), k, per_node) for k in range(hosts)]
        assert sum(served, []) == list(range(workers))
        assert per_node == (1 if workers == hosts else ranks)
    else:
        with pytest.raises(ClusterInputError) as e:
            check_inputs(hosts, ranks, None, manifest, digits_dir, None)
        msg = str(e.value)
        assert "\n" not in msg and f"is for {workers} workers" in msg
        assert f"--workers {hosts * ranks} (one worker per rank)" in msg
        assert f"--workers {hosts} (one worker per host)" in msg
        assert manifest_ranks_per_node(workers, hosts, ranks) is None


def test_tbf_parameters_fit_a_frame_at_every_rate():
    for mbit in (0.5, 1, 10, 1000):
        params = dict(zip(*[iter(tbf_args(mbit))] * 2))
        assert int(params["burst"]) >= 1514  # a full Ethernet frame must fit, or tbf drops everything
        assert int(params["limit"]) >= int(params["burst"])
        assert params["rate"] == f"{mbit * 1000:.0f}kbit"


@needs_netns
def test_two_hosts_two_ranks_end_identical(tmp_path, digits_dir):
    steps, tau = 15, 5
    manifest_path = str(tmp_path / "m.yaml")
    write_manifest(build_manifest(load_index(digits_dir), 4, 0.5, partition="label_sorted", seed=0), manifest_path)
    work = str(tmp_path / "cluster")
    proc = _cluster(["--hosts", "2", "--ranks-per-host", "2", "--bandwidth-mbit", "100", "--manifest", manifest_path,
                     "--source", digits_dir, "--timeout-s", "400", "--",
                     "train.py", "--recipe", "recipes/digits.yaml", "algorithm=risgd", "mu=0.5", f"steps={steps}",
                     f"tau={tau}", f"eval_every={tau}", "data.shards={data}", f"data.manifest={manifest_path}",
                     f"runs_dir={tmp_path / 'runs'}", "run_name=netns", "wandb.mode=offline"], work)
    out, err = proc.communicate(timeout=480)
    logs = "".join(open(os.path.join(work, f"host{k}.log")).read()[-2000:] for k in range(2)
                   if os.path.exists(os.path.join(work, f"host{k}.log")))
    assert proc.returncode == 0, err + logs
    assert _namespaces(proc.pid) == []  # torn down

    with open(tmp_path / "runs" / "netns" / "summary.json") as f:
        summary = json.load(f)
    digests = summary["rank_model_sha256"]
    assert summary["world_size"] == 4 and len(digests) == 4
    assert len(set(digests)) == 1 and digests[0] == summary["model_sha256"]  # every rank: the same average
    assert summary["comm_rounds"] == steps // tau

    # Each host holds exactly the shards its two ranks need, copied by data.replicate.
    manifest = load_manifest(manifest_path)
    for k in range(2):
        held = {n for n in os.listdir(os.path.join(work, f"host{k}", "data")) if n.startswith("train-")}
        needed = {s for r in node_ranks(manifest, k, 2) for s in manifest["ranks"][r]["shards"]}
        assert held == needed

    # The averages crossed the shaped links: each host sent at least the payload of every round.
    with open(os.path.join(work, "traffic.json")) as f:
        traffic = json.load(f)
    assert all(h["tx_bytes"] >= summary["comm_bytes"] for h in traffic["per_host"]), traffic


@needs_netns
def test_replication_runs_from_any_working_directory(tmp_path, digits_dir):
    manifest_path = str(tmp_path / "m.yaml")
    write_manifest(build_manifest(load_index(digits_dir), 4, 0.5, partition="label_sorted", seed=0), manifest_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    work = str(tmp_path / "cluster")
    proc = _cluster(["--hosts", "2", "--ranks-per-host", "2", "--manifest", manifest_path, "--source", digits_dir,
                     "--", "--no_python", "--no_local_rank", "true"], work, module="risgd_hosts.netns_cluster",
                    cwd=str(elsewhere))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    manifest = load_manifest(manifest_path)
    for k in range(2):
        held = {n for n in os.listdir(os.path.join(work, f"host{k}", "data")) if n.startswith("train-")}
        assert held == {s for r in node_ranks(manifest, k, 2) for s in manifest["ranks"][r]["shards"]}
    assert _namespaces(proc.pid) == []


@needs_netns
def test_node_level_manifest_replicates_one_worker_per_host(tmp_path, digits_dir):
    manifest_path = str(tmp_path / "m.yaml")
    write_manifest(build_manifest(load_index(digits_dir), 2, 0.5, partition="label_sorted", seed=0), manifest_path)
    work = str(tmp_path / "cluster")
    proc = _cluster(["--hosts", "2", "--ranks-per-host", "2", "--manifest", manifest_path, "--source", digits_dir,
                     "--", "--no_python", "--no_local_rank", "true"], work)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    manifest = load_manifest(manifest_path)
    for k in range(2):  # host k holds worker k's shards, which its two ranks split
        held = {n for n in os.listdir(os.path.join(work, f"host{k}", "data")) if n.startswith("train-")}
        assert held == set(manifest["ranks"][k]["shards"])
    assert _namespaces(proc.pid) == []


@needs_netns
@pytest.mark.parametrize("how", ["interrupt", "failed_host"])
def test_torn_down_on_interrupt_and_failure(tmp_path, how):
    work = str(tmp_path / "cluster")
    if how == "interrupt":
        proc = _cluster(["--hosts", "2", "--", "--no_python", "--no_local_rank", "sleep", "317.5"], work)
        deadline = time.monotonic() + 120
        while not any("sleep" in open(f"/proc/{pid}/cmdline").read()
                      for ns in _namespaces(proc.pid)
                      for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                text=True).stdout.split()
                      if os.path.exists(f"/proc/{pid}/cmdline")):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
    else:
        proc = _cluster(["--hosts", "2", "--", "train.py", "--recipe", "recipes/no-such-recipe.yaml"], work)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1
        assert err.strip().count("\n") == 0 and "exited with" in err and "host" in err, err
    assert _namespaces(proc.pid) == []
    left = subprocess.run(["pgrep", "-f", "sleep 317.5"], capture_output=True, text=True).stdout.split()
    assert left == []
