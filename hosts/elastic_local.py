"""Local "nodes" for elastic runs: one stock torchrun agent per node on one machine (loopback).

    from risgd_hosts.elastic_local import prepare_replicas, start_agent, kill_node
    manifest, replicas = prepare_replicas(shards, out_dir, workers=3, mu=0.5, partition="label_sorted")
    agents = [start_agent(k, replicas[k], port, train_args, log_dir, nnodes="2:3") for k in range(3)]
    kill_node(agents[2])   # the agent and its workers (they run in sessions of their own), SIGKILL

Each agent is ``risgd-elastic --nnodes=MIN:MAX --nproc-per-node 1 --rdzv-backend=c10d
--rdzv-endpoint=127.0.0.1:PORT -- ARGS`` (torchrun's own agent; risgd_tools.elastic_launch),
agent 0 hosting the c10d store
(``is_host``), so killing another agent loses a node and not the rendezvous. Its node's replica
is given by ``RISGD_REPLICA_DIR`` (on a real cluster: ``data.shards``, the node-local path). No
agent or rendezvous of our own: this only starts the stock ones.
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


def start_agent(k: int, replica: str, port: int, train_args: list[str], log_dir: str, nnodes: str,
                max_restarts: int = 3, last_call_s: int = 5, keep_alive_s: int = 2,
                env_extra: dict | None = None, host: str = "127.0.0.1", rdzv_extra: str = "",
                prefix: list[str] | None = None, local_addr: str | None = None) -> subprocess.Popen:
    """Agent ``k`` (0 hosts the rendezvous store) running the trainer with ``train_args`` on ``replica``.

    ``last_call_s``: how long a rendezvous that has MIN nodes waits for more (torch's default 30);
    ``keep_alive_s``: the agents' heartbeat period; a node missing 3 is dropped from the rendezvous
    (torch's default 5, so a dead node holds the next rendezvous up for 15 s). ``host``: the
    rendezvous host's address; ``rdzv_extra``: more ``--rdzv-conf`` (``,key=value``); ``prefix``:
    what the command runs under (``ip netns exec NS`` for a namespace host); ``local_addr``: the
    address this node's workers are reached at (torchrun's ``--local-addr``)."""
    env = {key: v for key, v in os.environ.items() if not key.startswith("WANDB_")}
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torch 2.14 agents otherwise reuse the first round's shared store
    # after a membership change and the restarted workers find the old workers' gloo addresses there
    env.update({"RISGD_REPLICA_DIR": replica, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, **(env_extra or {}))
    cmd = [sys.executable, "-m", "risgd_tools.elastic_launch", f"--nnodes={nnodes}", "--nproc-per-node=1",
           f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}",
           "--rdzv-id=risgd-elastic",
           f"--rdzv-conf=is_host={int(k == 0)},last_call_timeout={last_call_s},keep_alive_interval={keep_alive_s}"
           f"{rdzv_extra}", "--monitor-interval=1",
           *([f"--local-addr={local_addr}"] if local_addr else []), "--", *train_args]
    log = open(os.path.join(log_dir, f"agent{k}.log"), "w")
    return subprocess.Popen([*(prefix or []), *cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL the agent's process group and its workers' (torchrun starts each worker in a session
    of its own): everything of that node at once, as a power cut would."""
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
