"""Local "nodes" of an elastic run on one machine: replicas, one ``risgd-elastic`` per node, a node killed.

    from risgd_hosts.elastic_local import prepare_replicas, start_node, kill_node
    manifest, replicas = prepare_replicas(shards, out_dir, workers=3, mu=0.5, partition="label_sorted")
    nodes = [start_node(k, replicas[k], "http://127.0.0.1:29510", train_args, log_dir) for k in range(3)]
    kill_node(nodes[2])   # the launcher and its ranks, SIGKILL

Each node is ``risgd-elastic --nproc-per-node 1 --lighthouse URL -- ARGS`` (torchrun on that node
alone; risgd_tools.elastic_launch) with its replica given by ``RISGD_REPLICA_DIR`` (on a real cluster:
``data.shards``, the node-local path). The run's torchft lighthouse is started by the caller
(``risgd_hosts.live_cluster.lighthouse_command``). No agent or protocol of our own: this only starts
the stock ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run_manifest(shards: str, out_dir: str, workers: int, mu: float, partition: str = "iid",
                       seed: int = 0) -> str:
    """``out_dir/manifest.yaml`` for ``workers`` workers over the shards in ``shards``; its path."""
    from risgd_data.index import load_index
    from risgd_data.manifest import build_manifest, write_manifest

    os.makedirs(out_dir, exist_ok=True)
    manifest = os.path.join(out_dir, "manifest.yaml")
    write_manifest(build_manifest(load_index(shards), workers, mu, partition=partition, seed=seed), manifest)
    return manifest


def prepare_replicas(shards: str, out_dir: str, workers: int, mu: float, partition: str = "iid",
                     seed: int = 0) -> tuple[str, list[str]]:
    """A manifest for ``workers`` workers and one replica directory per worker (``data.replicate``)."""
    from risgd_data.replicate import replicate

    manifest = write_run_manifest(shards, out_dir, workers, mu, partition, seed)
    replicas = []
    for k in range(workers):
        dest = os.path.join(out_dir, f"node{k}")
        replicate(manifest, shards, dest, node_rank=k, ranks_per_node=1, log=lambda *_: None)
        replicas.append(dest)
    return manifest, replicas


def start_node(k: int, replica: str, lighthouse: str, train_args: list[str], log_dir: str,
               prefix: list[str] | None = None, addr: str = "127.0.0.1", env_extra: dict | None = None,
               ranks: int = 1) -> subprocess.Popen:
    """Node ``k`` of an elastic run: ``risgd-elastic`` (torchrun on this node alone) running the trainer
    with ``train_args`` on ``replica``, meeting the others at ``lighthouse``; ``prefix``: what the command
    runs under (``ip netns exec NS`` for a namespace host); ``addr``: the address the others reach it at."""
    from risgd_common.ports import free_port

    env = {key: v for key, v in os.environ.items() if not key.startswith("WANDB_")}
    env.update({"RISGD_REPLICA_DIR": replica, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RUST_LOG": "error"},
               **(env_extra or {}))
    cmd = [sys.executable, "-m", "risgd_tools.elastic_launch", "--nproc-per-node", str(ranks), "--master-addr", addr,
           "--master-port", str(free_port()), "--lighthouse", lighthouse, "--", *train_args]
    log = open(os.path.join(log_dir, f"node{k}.log"), "a")
    return subprocess.Popen([*(prefix or []), *cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and its ranks' (torchrun may start each in a session of
    its own): everything of that node at once, as a crash would."""
    groups = {agent.pid}
    for pid in _descendants(agent.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()
