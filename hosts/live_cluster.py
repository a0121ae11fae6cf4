"""A fault-tolerant run on one machine: torchft's lighthouse and nodes of :mod:`risgd_hosts.live_node`,
started, crashed, frozen and brought back from outside, with their step records.

Each node is its own process group (its ranks spawned inside it), so a crash is ``SIGKILL`` to the
group and a power cut as the others see it is ``SIGSTOP`` (silent: no connection reset, no heartbeat)
followed later by ``SIGKILL``. Times are this process's clock (``time.time()``, the nodes' records use
the same clock on one machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from risgd_common.ports import free_port


def lighthouse_command(port: int, min_replicas: int = 1, heartbeat_ms: int = 1000, join_timeout_ms: int = 60000,
                       tick_ms: int = 50) -> list[str]:
    """torchft's lighthouse: a quorum of whichever nodes are live (min 1: the run's floor is its own),
    waiting for heartbeating nodes up to ``join_timeout_ms`` (a live node is never left out of a round),
    dropping a node ``heartbeat_ms`` after its last heartbeat."""
    exe = shutil.which("torchft_lighthouse") or os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")
    return [exe, "--min_replicas", str(min_replicas), "--join_timeout_ms", str(join_timeout_ms),
            "--quorum_tick_ms", str(tick_ms), "--heartbeat_timeout_ms", str(heartbeat_ms), "--bind", f"[::]:{port}"]


def wait_port(port: int, prefix: list[str], timeout: float = 60.0, process: subprocess.Popen | None = None) -> bool:
    """Wait until something listens on ``port``: True; False as soon as ``process`` (the one that should
    listen) has exited, e.g. because another process took the port between free_port() and its bind."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        if prefix:  # inside a test host's namespace
            probe = subprocess.run([*prefix, "bash", "-c", f"</dev/tcp/127.0.0.1/{port}"], capture_output=True)
            if probe.returncode == 0:
                return True
        else:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return True
        time.sleep(0.05)
    raise TimeoutError(f"the lighthouse did not listen on port {port} within {timeout:g} s")


class LiveCluster:
    """``workers`` nodes of one run in ``work_dir`` (logs ``nK.jsonl``/``nK.err``), each started with
    ``node_args`` (live_node's options besides --worker, --workers, --port, --log)."""

    def __init__(self, work_dir: str, workers: int, node_args: list[str], heartbeat_ms: int = 1000, hosts=None,
                 min_replicas: int = 1):
        self.dir, self.workers, self.node_args, self.hosts = work_dir, workers, node_args, hosts
        self.nodes: dict[int, subprocess.Popen] = {}
        os.makedirs(work_dir, exist_ok=True)
        for name in os.listdir(work_dir):  # a run's records start empty (the nodes append to them)
            if name.endswith((".jsonl", ".err")):
                os.unlink(os.path.join(work_dir, name))
        for _ in range(3):  # a port taken by another process between free_port() and the bind: another port
            self.port = free_port()
            command = [*self._prefix(0), *lighthouse_command(self.port, min_replicas, heartbeat_ms=heartbeat_ms)]
            self.lighthouse = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                               stderr=open(self._path("lighthouse.err"), "a"))
            if wait_port(self.port, self._prefix(0), process=self.lighthouse):
                break
        else:
            with open(self._path("lighthouse.err")) as f:
                raise RuntimeError(f"the lighthouse did not start in 3 tries: {f.read()[-500:]}")
        self.env = dict(os.environ, TORCHFT_LIGHTHOUSE=f"http://{self._addr(0)}:{self.port}", RUST_LOG="error",
                        OMP_NUM_THREADS="1")
        if hosts is not None:  # collectives on the shaped interface
            self.env.update(GLOO_SOCKET_IFNAME="eth0")

    def _prefix(self, k: int) -> list[str]:
        """Run on test host ``k`` (a network namespace of ``hosts``), or here."""
        return self.hosts.exec_prefix(k) if self.hosts is not None else []

    def _addr(self, k: int) -> str:
        return self.hosts.addr(k) if self.hosts is not None else "127.0.0.1"

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def start(self, worker: int, extra: list[str] | None = None) -> subprocess.Popen:
        cmd = [*self._prefix(worker), sys.executable, "-m", "risgd_hosts.live_node", "--worker", str(worker),
               "--workers", str(self.workers), "--port", str(free_port()), "--addr", self._addr(worker),
               "--log", self._path(f"n{worker}.jsonl"), *self.node_args, *(extra or [])]
        if self.hosts is not None:
            subprocess.run(["ip", "-n", self.hosts.ns(worker), "link", "set", "eth0", "up"], check=True)
        p = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=open(self._path(f"n{worker}.err"), "a"))
        self.nodes[worker] = p
        return p

    def kill(self, worker: int) -> float:
        """A crash: every process of the node killed (the others see their connections reset)."""
        t = time.time()
        os.killpg(self.nodes[worker].pid, signal.SIGKILL)
        self.nodes[worker].wait()
        return t

    def power_cut(self, worker: int) -> float:
        """On a test host: its link down, then its processes killed (the others see silence, no reset)."""
        t = time.time()
        subprocess.run(["ip", "-n", self.hosts.ns(worker), "link", "set", "eth0", "down"], check=True)
        os.killpg(self.nodes[worker].pid, signal.SIGKILL)
        self.nodes[worker].wait()
        return t

    def freeze(self, worker: int) -> float:
        """A power cut as the others see it: the node silent (no reset, no heartbeat); kill() it later."""
        t = time.time()
        os.killpg(self.nodes[worker].pid, signal.SIGSTOP)
        return t

    def kill_lighthouse(self) -> float:
        t = time.time()
        self.lighthouse.kill()
        self.lighthouse.wait()
        return t

    def records(self, worker: int) -> list[dict]:
        return read_jsonl(self._path(f"n{worker}.jsonl"))

    def step(self, worker: int) -> int:
        steps = [r["step"] for r in self.records(worker) if "loss" in r]
        return steps[-1] if steps else 0

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:g} s ({self.dir})")
            time.sleep(0.02)

    def wait_step(self, worker: int, step: int, timeout: float = 120.0) -> None:
        self.wait_for(lambda: self.step(worker) >= step, timeout, f"node {worker} at step {step}")

    def wait_all(self, timeout: float = 300.0) -> dict[int, int]:
        """Wait for every running node to exit; their exit statuses."""
        deadline = time.monotonic() + timeout
        out = {}
        for w, p in self.nodes.items():
            try:
                out[w] = p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"node {w} still running after {timeout:g} s ({self.dir})") from None
        return out

    def close(self) -> None:
        for p in self.nodes.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        if self.lighthouse.poll() is None:
            self.lighthouse.kill()
            self.lighthouse.wait()

    def __enter__(self) -> LiveCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str) -> list[dict]:
    """The JSON lines of a file being appended to (none if it is not there yet; a line being written is skipped)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def first_step_after(records: list[dict], t: float) -> dict | None:
    """The first step a node completed after time ``t``."""
    return next((r for r in records if "loss" in r and r["t"] > t), None)
