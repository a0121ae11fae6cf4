"""Test hosts on one machine: N network namespaces on a shaped-link switch, one DeepSpeed launch each.

    sudo .venv/bin/python -m hosts.netns_cluster --hosts 4 --bandwidth-mbit 10 \\
        --manifest m.yaml --source shards/digits --work-dir runs/netns -- \\
        train.py --recipe recipes/digits.yaml data.shards={data} data.manifest=m.yaml

``python -m hosts.netns_cluster`` works from the repository root; ``risgd-netns-cluster`` (or
``python -m risgd_hosts.netns_cluster``) from anywhere. The old ``python -m recipes.netns_cluster``
is an alias of the same command.

What it builds (root and iproute2 needed):

- a "switch" namespace holding a Linux bridge, and one namespace per host (``hostK``) with an
  ``eth0`` veth whose other end is a bridge port. Host K is 10.93.0.(K+1)/24. Every address lives
  inside these namespaces; nothing is added to the machine's own network.
- each link is shaped with ``tc tbf`` in both directions: on the host's eth0 (upload) and on the
  bridge port (download), so a host sends and receives at most the given bandwidth, like a NIC.
- each host's local data directory ``WORK/hostK/data``, filled by ``python -m risgd_data.replicate``
  (run inside the host's namespace) with exactly the shards the manifest gives that host's ranks;
  the manifest must be for ``hosts x ranks-per-host`` workers (one per rank: host K serves workers
  K*R .. K*R+R-1) or for ``hosts`` workers (node-level: one worker per host, whose R ranks split its
  data; host K serves worker K).
- a hostfile (``hostK slots=R``) and, in each namespace, the stock launcher:
  ``deepspeed --hostfile H --no_ssh --node_rank K --master_addr 10.93.0.1 --master_port P CMD``
  with ``GLOO_SOCKET_IFNAME=eth0`` (and ``NCCL_SOCKET_IFNAME``) so collectives use the shaped link.
  ``{data}`` and ``{host}`` in CMD become the host's data directory and index.

- with ``--cpus C[,C...]`` each host's processes are held to that many cores by a CFS quota (a cgroup v1 cpu group
  per host, joined before the command enters its namespace; 20 ms period): a slow node is a host with fewer. With
  the caps summing to the machine's cores, a host never runs faster because another one is slowed.

Everything is torn down on exit, on failure and on Ctrl-C/SIGTERM: the processes inside the
namespaces are killed and the namespaces deleted (which deletes the links). Bytes each host sent
and received on eth0 are written to ``WORK/traffic.json``. Ranks of one host reach each other over
loopback, as GPUs of one node do over NVLink; only inter-host traffic crosses the shaped links.
All hosts share this machine's cores, so each rank gets ``cores / total ranks`` threads. Paths in
the command are relative to the current directory, as they would be on a real node.

Exit status: 0 done; 2 bad input (arguments, a missing manifest or shard source, a manifest for
another number of ranks), refused before anything is built; 1 the work failed (namespaces not
usable here, a host's replication or launch failed, the timeout passed); 130 interrupted. Errors
are one line on stderr, ``error: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from risgd_common.cli import Parser
from risgd_common.layout import Layout
from risgd_common.progress import Progress

CPU_CGROUP = "/sys/fs/cgroup/cpu"  # cgroup v1's cpu controller (cfs quota); v2's cpu.max under /sys/fs/cgroup
SUBNET = "10.93.0"  # private, and only ever assigned inside namespaces this tool creates
MASTER_PORT = 29500
MAX_HOSTS = 200  # addresses .1 to .200 of the /24


class ClusterError(RuntimeError):
    """The test hosts cannot be built or a host's launch failed."""


class ClusterInputError(ClusterError):
    """Bad input, refused before anything is built: arguments, manifest or shard source."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode:
        raise ClusterError(f"'ip {' '.join(args)}' failed: {proc.stderr.strip()}")
    return proc


def netns_available() -> str | None:
    """None if namespaces, veth, bridges and tbf work here; otherwise the reason they do not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    name = f"risgd-probe-{os.getpid()}"
    try:
        proc = _ip("netns", "add", name, check=False)
        if proc.returncode:
            return f"'ip netns add' fails: {proc.stderr.strip()}"
        steps = [["ip", "-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "a1"],
                 ["ip", "-n", name, "link", "add", "b0", "type", "bridge"],
                 ["tc", "-n", name, "qdisc", "add", "dev", "a0", "root", "tbf", "rate", "1mbit", "burst", "16kb",
                  "limit", "64kb"]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                return f"'{' '.join(cmd[:6])} ...' fails: {proc.stderr.strip()}"
        return None
    finally:
        _ip("netns", "del", name, check=False)


def tbf_args(bandwidth_mbit: float) -> list[str]:
    """tc tbf parameters for a link of this bandwidth.

    The bucket holds 10 ms of traffic (at least 4 full-size frames, so a frame always fits) and the
    queue 200 ms: TCP then sees the rate, not drops, as in a switch with ordinary buffers.
    """
    rate_bytes = bandwidth_mbit * 1e6 / 8
    burst = max(int(rate_bytes * 0.010), 4 * 1514)
    limit = max(int(rate_bytes * 0.200), 4 * burst)
    return ["rate", f"{bandwidth_mbit * 1000:.0f}kbit", "burst", str(burst), "limit", str(limit)]


@dataclass
class Cluster:
    """Namespaces, links and addresses of one set of test hosts."""

    hosts: int
    bandwidth_mbit: float | None      # None: unshaped veth links
    tag: str = field(default_factory=lambda: f"risgd{os.getpid()}")
    created: list[str] = field(default_factory=list)
    cpus: list[float] | None = None   # cores each host may use (a CFS quota on its processes); None: no cap
    cgroups: list[str] = field(default_factory=list)

    def ns(self, k: int) -> str:
        return f"{self.tag}-host{k}"

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def addr(self, k: int) -> str:
        return f"{SUBNET}.{k + 1}"

    def up(self) -> None:
        if not 1 <= self.hosts <= MAX_HOSTS:
            raise ClusterInputError(f"--hosts {self.hosts} is out of range: use 1 to {MAX_HOSTS}")
        for name in [self.switch] + [self.ns(k) for k in range(self.hosts)]:
            _ip("netns", "add", name)
            self.created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for k in range(self.hosts):
            port = f"p{k}"
            # Both ends are created inside the namespaces: no interface ever appears in the host's own.
            _ip("-n", self.ns(k), "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            if self.cpus is not None:
                self.cgroups.append(_cpu_cgroup(f"{self.tag}-host{k}", self.cpus[k]))
            _ip("-n", self.ns(k), "addr", "add", f"{self.addr(k)}/24", "dev", "eth0")
            _ip("-n", self.ns(k), "link", "set", "eth0", "up")
            if self.bandwidth_mbit:
                for ns, dev in ((self.ns(k), "eth0"), (self.switch, port)):
                    cmd = ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", *tbf_args(self.bandwidth_mbit)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode:
                        raise ClusterError(f"'{' '.join(cmd)}' failed: {proc.stderr.strip()}")

    def down(self) -> None:
        """Kill what runs in the namespaces, then delete them (links go with them). Idempotent."""
        for name in reversed(self.created):
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for name in reversed(self.created):
            for _ in range(50):  # a namespace with dying processes can take a moment to let go
                if _ip("netns", "del", name, check=False).returncode == 0:
                    break
                time.sleep(0.1)
        self.created.clear()
        for group in self.cgroups:
            _kill_cgroup(group)
        self.cgroups.clear()

    def traffic(self) -> list[dict[str, int]]:
        """Bytes and packets host K sent and received on its eth0 so far."""
        out = []
        for k in range(self.hosts):
            stats = json.loads(_ip("-n", self.ns(k), "-s", "-j", "link", "show", "eth0").stdout)[0]["stats64"]
            out.append({"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
                        "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"]})
        return out

    def exec_prefix(self, k: int) -> list[str]:
        prefix = ["ip", "netns", "exec", self.ns(k)]
        if self.cgroups:  # the command joins its host's CPU cap first (outside: `ip netns exec` mounts its own
            # /sys), then enters the namespace; what it starts inherits the cap
            prefix = ["sh", "-c", f'echo $$ > {self.cgroups[k]}/cgroup.procs && exec "$@"', "sh", *prefix]
        return prefix


def _cpu_cgroup(name: str, cores: float) -> str:
    """A cpu cgroup whose processes may use ``cores`` cores (CFS: quota = cores x period)."""
    if not os.path.isdir(CPU_CGROUP):
        raise ClusterError(f"--cpus needs cgroup v1's cpu controller at {CPU_CGROUP}; it is not mounted here")
    path = os.path.join(CPU_CGROUP, name)
    os.makedirs(path, exist_ok=True)
    period = 20_000  # 20 ms: a finer grain than CFS's default 100 ms, whose throttling makes steps jerky
    with open(os.path.join(path, "cpu.cfs_period_us"), "w") as f:
        f.write(str(period))
    with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
        f.write(str(max(1000, int(cores * period))))
    return path


def _kill_cgroup(path: str) -> None:
    """Kill what is left in a host's cgroup and remove it."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            for pid in f.read().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    except FileNotFoundError:
        return
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)


@contextmanager
def torn_down_on_exit(cluster: Cluster):
    """Build the cluster; tear it down however the block ends (SIGINT, SIGTERM and SIGHUP included)."""
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a tool started in the background by a non-interactive shell inherits it ignored
    previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
        for s, handler in previous.items():
            signal.signal(s, handler)


def launcher() -> list[str]:
    """The stock ``deepspeed`` launcher of this Python environment."""
    script = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "deepspeed.launcher.runner"]


def host_env(cluster: Cluster, ranks_per_host: int) -> dict[str, str]:
    env = dict(os.environ)
    # Collectives (and DeepSpeed's rendezvous) on the shaped interface, not loopback.
    env.update(GLOO_SOCKET_IFNAME="eth0", NCCL_SOCKET_IFNAME="eth0", PYTHONUNBUFFERED="1")
    # All test hosts share this machine's cores: one thread share per rank, not per host.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (cluster.hosts * ranks_per_host))))
    return env


def manifest_ranks_per_node(workers: int, hosts: int, ranks_per_host: int) -> int | None:
    """Manifest workers each host serves (replicate's --ranks-per-node): ranks_per_host for a
    per-rank manifest (workers = hosts x ranks_per_host), 1 for a node-level one (workers = hosts),
    None for any other number of workers. When both fit (ranks_per_host 1) they agree."""
    world = hosts * ranks_per_host
    for node_size in (1, ranks_per_host):  # a worker per rank, or a worker per host (the node level)
        if Layout(world, node_size).workers == workers:
            return ranks_per_host // node_size
    return None


def replicate_data(cluster: Cluster, work_dir: str, manifest: str, source: str, ranks_per_host: int) -> list[str]:
    """Each host's local data directory, filled inside its namespace by the replication command.

    A node-level manifest (one worker per host) is replicated with --ranks-per-node 1: host K gets
    worker K's shards, which its ranks split."""
    from risgd_data.manifest import load_manifest

    per_node = manifest_ranks_per_node(load_manifest(manifest)["workers"], cluster.hosts, ranks_per_host)
    if per_node is None:  # check_inputs refuses this first
        raise ClusterInputError(f"manifest {manifest} does not fit {cluster.hosts} hosts x {ranks_per_host} ranks")
    dirs = []
    for k in range(cluster.hosts):
        dest = os.path.join(work_dir, f"host{k}", "data")
        # By its installed name, so it runs whatever the current directory.
        cmd = [*cluster.exec_prefix(k), sys.executable, "-m", "risgd_data.replicate", "--manifest", manifest,
               "--source", source, "--dest", dest, "--node-rank", str(k), "--ranks-per-node", str(per_node)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise ClusterError(f"host{k}: data replication failed: {_one_line(proc.stderr or proc.stdout)}")
        dirs.append(dest)
    return dirs


def launch(cluster: Cluster, command: list[str], work_dir: str, ranks_per_host: int, data_dirs: list[str] | None,
           timeout_s: float | None = None, master_port: int = MASTER_PORT, progress: bool = True) -> None:
    """Start the stock launcher on every host; wait for all; on any failure stop the others. With
    ``progress`` (default) the run's step and time left are said on stderr from host 0's log (rank 0's
    progress bar; :mod:`risgd_common.progress`)."""
    hostfile = os.path.join(work_dir, "hostfile")
    with open(hostfile, "w") as f:
        f.writelines(f"host{k} slots={ranks_per_host}\n" for k in range(cluster.hosts))
    env = host_env(cluster, ranks_per_host)
    procs = []
    for k in range(cluster.hosts):
        subst = {"{host}": str(k), "{data}": data_dirs[k] if data_dirs else ""}
        cmd = [_substitute(arg, subst) for arg in command]
        full = [*cluster.exec_prefix(k), *launcher(), "--hostfile", hostfile, "--no_ssh", "--node_rank", str(k),
                "--master_addr", cluster.addr(0), "--master_port", str(master_port), *cmd]
        log = open(os.path.join(work_dir, f"host{k}.log"), "w")
        procs.append((subprocess.Popen(full, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    said = Progress([], os.path.join(work_dir, "host0.log")) if progress else None
    polled = time.monotonic()
    try:
        # Like the launcher on one node: the first host to fail ends the job on all of them.
        while (failed := _first_failure(procs)) is None and any(p.poll() is None for p, _ in procs):
            if deadline is not None and time.monotonic() > deadline:
                raise ClusterError(f"the run did not finish within {timeout_s:.0f} s: see {work_dir}/host*.log")
            time.sleep(0.2)
            if said is not None and time.monotonic() - polled >= 1:
                said.poll()
                polled = time.monotonic()
    finally:
        if said is not None:
            said.close()
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
    if failed is not None:
        raise ClusterError(f"host{failed}'s launch exited with {procs[failed][0].returncode}: "
                           f"see {os.path.join(work_dir, f'host{failed}.log')}")


def _first_failure(procs: list) -> int | None:
    return next((k for k, (p, _) in enumerate(procs) if p.poll() not in (None, 0)), None)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _is_local(source: str) -> bool:
    return "://" not in source and not source.startswith("pipe:")


def check_inputs(hosts: int, ranks_per_host: int, bandwidth_mbit: float | None, manifest: str | None,
                 source: str | None, timeout_s: float | None) -> None:
    """Refuse bad input before anything is built (ClusterInputError, one line that says the fix)."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise ClusterInputError(f"--hosts {hosts} is out of range: use 1 to {MAX_HOSTS}")
    if ranks_per_host < 1:
        raise ClusterInputError(f"--ranks-per-host {ranks_per_host} must be at least 1")
    if bandwidth_mbit is not None and not bandwidth_mbit > 0:
        raise ClusterInputError(f"--bandwidth-mbit {bandwidth_mbit:g} must be > 0 (leave it out for unshaped links)")
    if timeout_s is not None and not timeout_s > 0:
        raise ClusterInputError(f"--timeout-s {timeout_s:g} must be > 0")
    if (manifest is None) != (source is None):
        raise ClusterInputError("give both --manifest and --source (to fill each host's data directory) or neither")
    if manifest is None:
        return
    if not os.path.isfile(manifest):
        raise ClusterInputError(f"manifest {manifest} not found: build it with python -m risgd_data.manifest build")
    if _is_local(source) and not os.path.isfile(os.path.join(source, "index.json")):
        what = "has no index.json" if os.path.isdir(source) else "is not a directory"
        raise ClusterInputError(f"shard source {source} {what}: make the shards with python -m risgd_data.make_shards")
    from risgd_data.errors import DataError
    from risgd_data.manifest import load_manifest

    try:
        workers = load_manifest(manifest)["workers"]
    except DataError as e:
        raise ClusterInputError(str(e)) from None
    if manifest_ranks_per_node(workers, hosts, ranks_per_host) is None:
        raise ClusterInputError(f"manifest {manifest} is for {workers} workers but --hosts {hosts} x "
                                f"--ranks-per-host {ranks_per_host} makes {hosts * ranks_per_host} ranks: "
                                f"change them or rebuild the manifest with --workers {hosts * ranks_per_host} "
                                f"(one worker per rank) or --workers {hosts} (one worker per host)")


def _substitute(arg: str, subst: dict[str, str]) -> str:
    for key, value in subst.items():
        arg = arg.replace(key, value)
    return arg


def run(command: list[str], hosts: int, ranks_per_host: int = 1, bandwidth_mbit: float | None = None,
        work_dir: str = "runs/netns", manifest: str | None = None, source: str | None = None,
        timeout_s: float | None = None, cpus: list[float] | None = None) -> dict:
    """Build the hosts, replicate data, run ``command`` on all of them, tear down; return the traffic.
    ``cpus``: the cores each host may use (one per host; a slow node is one with fewer), None: no cap.

    Raises ClusterInputError for bad input (before anything is built) and ClusterError when the work
    fails.
    """
    if not command:
        raise ClusterInputError("give the training command after --, e.g. -- train.py --recipe recipes/digits.yaml")
    check_inputs(hosts, ranks_per_host, bandwidth_mbit, manifest, source, timeout_s)
    if cpus is not None and (len(cpus) != hosts or not all(c > 0 for c in cpus)):
        raise ClusterInputError(f"--cpus {','.join(f'{c:g}' for c in cpus)}: give one number of cores > 0 per host "
                                f"({hosts}), or one for all")
    why = netns_available()
    if why:
        raise ClusterError(f"network namespaces are not usable here: {why}")
    os.makedirs(work_dir, exist_ok=True)
    cluster = Cluster(hosts, bandwidth_mbit, cpus=cpus)
    with torn_down_on_exit(cluster):
        data_dirs = replicate_data(cluster, work_dir, manifest, source, ranks_per_host) if manifest else None
        before = cluster.traffic()
        t0 = time.perf_counter()
        launch(cluster, command, work_dir, ranks_per_host, data_dirs, timeout_s)
        seconds = time.perf_counter() - t0
        after = cluster.traffic()
    traffic = {"hosts": hosts, "ranks_per_host": ranks_per_host, "bandwidth_mbit": bandwidth_mbit,
               "seconds": seconds,
               "per_host": [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)]}
    with open(os.path.join(work_dir, "traffic.json"), "w") as f:
        json.dump(traffic, f, indent=2)
    return traffic


def main(argv: list[str] | None = None) -> int:
    script = os.path.basename(sys.argv[0])
    prog = script if script == "risgd-netns-cluster" else "python -m hosts.netns_cluster"
    parser = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, required=True, help="number of test hosts (namespaces)")
    parser.add_argument("--ranks-per-host", type=int, default=1, help="ranks (slots) per host (default 1)")
    parser.add_argument("--bandwidth-mbit", type=float, default=None,
                        help="shape every link to this many Mbit/s each way (default: unshaped)")
    parser.add_argument("--manifest", default=None, help="redundancy manifest for data replication")
    parser.add_argument("--source", default=None,
                        help="shard source the hosts replicate from (see python -m risgd_data.replicate)")
    parser.add_argument("--work-dir", default="runs/netns", help="hostfile, logs, data (default runs/netns)")
    parser.add_argument("--timeout-s", type=float, default=None, help="stop the run after this many seconds")
    parser.add_argument("--cpus", default=None, metavar="C[,C...]",
                        help="cores each host may use (a CFS quota on its processes): one number for all hosts or "
                             "one per host, e.g. 0.5,0.5,0.5,0.17 for a node at a third of the others' speed "
                             "(default: no cap)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: the training script and its arguments ({data}, {host} are substituted)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        cpus = None
        if args.cpus is not None:
            try:
                cpus = [float(c) for c in args.cpus.split(",")]
            except ValueError:
                raise ClusterInputError(f"--cpus {args.cpus}: give numbers of cores, e.g. 0.5 or 0.5,0.5,0.17") \
                    from None
            cpus = cpus * args.hosts if len(cpus) == 1 else cpus
        traffic = run(command, args.hosts, args.ranks_per_host, args.bandwidth_mbit, args.work_dir, args.manifest,
                      args.source, args.timeout_s, cpus)
    except ClusterError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2 if isinstance(e, ClusterInputError) else 1
    except KeyboardInterrupt:
        print("interrupted: hosts torn down", file=sys.stderr)
        return 130
    sent = sum(h["tx_bytes"] for h in traffic["per_host"])
    print(f"{args.hosts} hosts x {args.ranks_per_host} ranks: {traffic['seconds']:.1f} s, "
          f"{sent / 1e6:.2f} MB sent over the links; per-host logs in {args.work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
