"""A lost node through the trainer on torchft: RI-SGD and PR-SGD, uninterrupted and with one node lost and back.

    sudo .venv/bin/python benchmarks/bench_elastic.py --netns --seeds 0 1 2 --out runs/bench-elastic-netns
    python benchmarks/bench_elastic.py --steps 600 --out runs/bench-elastic   # loopback, 3 nodes

One ``risgd-elastic`` per node (torchrun on that node alone, --nproc-per-node 1;
risgd_hosts.elastic_local) and one ``torchft_lighthouse`` (on host 0), digits label-sorted, one
manifest worker per node. ``--netns``: the nodes are network namespaces on a shaped-link switch
(hosts.netns_cluster; root), 4 by default, each with its own replica filled by ``replicate`` inside
its namespace. Without it, 3 nodes on 127.0.0.1. For each seed and algorithm (RI-SGD mu=0.5,
PR-SGD), the run is done twice: once uninterrupted, and once with the last node lost when the run
passes a step drawn at random from 20-40% of it (the same step for both algorithms of a seed).
``--fault crash`` (the default) SIGKILLs the node's processes (its link up: the others see their
connections reset); ``--fault power`` (netns) takes its link down first, then kills them (the others
see silence). ``--rejoin-after S``: S steps after the loss, the node comes back (its link up, the same
command started), is healed from a live peer and goes on. PR-SGD runs with elastic.min_coverage=0, so
that it keeps training on the data it still holds.

Every time is the bench's own clock, outside the trainer: the moment of the loss, and the moment the
recording node's ``metrics.jsonl`` shows the first round without the lost node (and, for the rejoin,
with it again), polled every 20 ms. Prints one row per run (those seconds, the steps redone, the
coverage after the loss, the run record's seconds lost and goodput, whether every node's final model
is the same, the final and best test accuracy), then per algorithm the mean final accuracy over the
seeds, uninterrupted and with the loss, and the goals of the live-recovery issue each met or not met.
``--plot`` writes test accuracy against step with the membership events marked. The machine's load
changes the seconds: say it with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from risgd_hosts.elastic_local import kill_node, prepare_replicas, start_node, write_run_manifest  # noqa: E402
from risgd_hosts.live_cluster import lighthouse_command, read_jsonl, wait_port  # noqa: E402
from risgd_hosts.local import free_port  # noqa: E402

ALGORITHMS = (("risgd", 0.5), ("prsgd", 0.0))


class LoopbackNodes:
    """N agents on 127.0.0.1; losing one is SIGKILL of its agent and worker."""

    def __init__(self, nodes: int, out: str):
        self.nodes, self.out = nodes, out
        self.dirs: dict[str, list[str]] = {}

    def prepare(self, algorithm: str, shards: str, mu: float) -> str:
        manifest, self.dirs[algorithm] = prepare_replicas(shards, os.path.join(self.out, f"replicas-{algorithm}"),
                                                          self.nodes, mu, "label_sorted")
        return manifest

    prefix: list[str] = []

    def addr(self, k: int) -> str:
        return "127.0.0.1"

    def start(self, k: int, algorithm: str, lighthouse: str, args: list[str], logs: str):
        return start_node(k, self.dirs[algorithm][k], lighthouse, args, logs, ranks=self.ranks)

    def lose(self, k: int, agent, fault: str) -> None:
        kill_node(agent)

    def revive(self, k: int) -> None:
        pass


class NetnsNodes:
    """N namespace hosts (hosts.netns_cluster); losing one is its link down, then SIGKILL of everything in it."""

    def __init__(self, nodes: int, out: str, bandwidth_mbit: float | None):
        from risgd_hosts.netns_cluster import Cluster, netns_available

        why = netns_available()
        if why:
            raise SystemExit(f"error: --netns needs network namespaces: {why}")
        self.cluster, self.out = Cluster(nodes, bandwidth_mbit), out
        self.nodes, self.dirs = nodes, {}

    def prepare(self, algorithm: str, shards: str, mu: float) -> str:
        from risgd_hosts.netns_cluster import replicate_data

        work = os.path.join(self.out, f"netns-{algorithm}")
        manifest = write_run_manifest(shards, work, self.nodes, mu, "label_sorted")
        self.dirs[algorithm] = replicate_data(self.cluster, work, manifest, shards, ranks_per_host=self.ranks)
        return manifest

    @property
    def prefix(self) -> list[str]:
        return self.cluster.exec_prefix(0)

    def addr(self, k: int) -> str:
        return self.cluster.addr(k)

    def start(self, k: int, algorithm: str, lighthouse: str, args: list[str], logs: str):
        c = self.cluster
        return start_node(k, self.dirs[algorithm][k], lighthouse, args, logs, ranks=self.ranks, prefix=c.exec_prefix(k),
                          addr=c.addr(k), env_extra={"GLOO_SOCKET_IFNAME": "eth0"})

    def _link(self, k: int, state: str) -> None:
        subprocess.run(["ip", "-n", self.cluster.ns(k), "link", "set", "eth0", state], check=True)

    def lose(self, k: int, agent, fault: str) -> None:
        if fault == "power":
            self._link(k, "down")  # first: no FIN or RST leaves the host, as in a power cut
        kill_node(agent)
        for pid in subprocess.run(["ip", "netns", "pids", self.cluster.ns(k)], capture_output=True,
                                  text=True).stdout.split():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass

    def revive(self, k: int) -> None:
        self._link(k, "up")


def _read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def run(name: str, algorithm: str, mu: float, nodes, manifest: str, out: str, a) -> dict:
    """One elastic run (a lighthouse and one launch per node); ``a.kill_at`` None: uninterrupted."""
    n, victim = nodes.nodes, nodes.nodes - 1
    args = ["--recipe", "recipes/digits.yaml", f"algorithm={algorithm}", f"mu={mu}", f"steps={a.steps}",
            f"tau={a.tau}", f"eval_every={a.eval_every}", f"checkpoint_every={a.checkpoint_every}",
            f"seed={a.seed}", "wandb.enabled=false", f"elastic.workers={n}", "elastic.min_coverage=0",
            f"elastic.op_timeout_s={a.op_timeout}", f"data.manifest={manifest}", f"runs_dir={out}", f"run_name={name}",
            *a.set]
    run_dir, logs = os.path.join(out, name), os.path.join(out, f"{name}-logs")
    os.makedirs(logs, exist_ok=True)
    port = free_port()
    lighthouse = subprocess.Popen([*nodes.prefix, *lighthouse_command(port, heartbeat_ms=a.heartbeat_ms)],
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(logs, "lighthouse.err"), "a"))
    wait_port(port, nodes.prefix)
    url = f"http://{nodes.addr(0)}:{port}"
    t0 = time.time()
    agents = [nodes.start(k, algorithm, url, args, logs) for k in range(n)]
    metrics = os.path.join(run_dir, "metrics.jsonl")
    phase, killed_step, lost_t, lost_event_t, back_t, joined_event_t = \
        ("kill" if a.kill_at is not None else "run"), None, None, None, None, None
    try:
        while any(x.poll() is None for x in agents[:victim]) or (phase == "back" and agents[victim].poll() is None):
            time.sleep(0.02)
            rows = read_jsonl(metrics)
            step = max((r["step"] for r in rows if "test_acc" in r), default=0)
            events = [r for r in rows if r.get("event") == "membership"]
            if phase == "kill" and step >= a.kill_at:
                killed_step, lost_t = step, time.time()
                nodes.lose(victim, agents[victim], a.fault)
                phase = "lost"
            elif phase == "lost" and lost_event_t is None and any(victim in e["lost_workers"] for e in events):
                lost_event_t = time.time()
            if phase == "lost" and lost_event_t is not None and a.rejoin_after is not None:
                lost = next(e for e in events if victim in e["lost_workers"])
                if step >= lost["step"] + a.rejoin_after:
                    nodes.revive(victim)
                    back_t = time.time()
                    agents[victim] = nodes.start(victim, algorithm, url, args, logs)
                    phase = "back"
            elif phase == "back" and joined_event_t is None and any(victim in e["joined_workers"] for e in events):
                joined_event_t = time.time()
    finally:
        for x in agents:
            if x.poll() is None:
                kill_node(x)
        lighthouse.kill()
        lighthouse.wait()
    summary = _read_json(os.path.join(run_dir, "summary.json"), None)
    if summary is None:
        raise SystemExit(f"error: run {name} did not finish: see the nodes' logs in {logs}")
    rows = read_jsonl(metrics)
    events = [e for e in rows if e.get("event") == "membership"]
    lost = next((e for e in events if e["lost_workers"]), {})
    back = next((e for e in events if victim in e["joined_workers"]), None)
    # every node that finished (the lost one only if it rejoined before the end: started too late, it finds the
    # others gone and the run's last checkpoint, and stops)
    finals = [_read_json(os.path.join(run_dir, "elastic", f"final-w{k:05d}.json"), {}).get("model_sha256")
              for k in range(n) if k != victim or a.kill_at is None or back is not None]
    return {"run": name, "algorithm": algorithm, "seed": a.seed, "killed_at": killed_step,
            "lost_at_round": lost.get("step"),
            "loss_to_round_s": None if lost_event_t is None else lost_event_t - lost_t,
            "steps_redone": summary.get("steps_redone"), "coverage_after": lost.get("data_coverage", 1.0),
            "rejoin_to_round_s": None if joined_event_t is None else joined_event_t - back_t,
            "world_sizes": summary["world_sizes"], "seconds_lost": summary.get("seconds_lost"),
            "goodput": summary.get("goodput"), "rejoined": None if a.kill_at is None else back is not None,
            "digests_equal": len(set(finals)) == 1 and None not in finals,
            "final_acc": summary["final_test_acc"], "best_acc": summary["best_test_acc"],
            "wall_s": time.time() - t0,
            "curve": [(r["step"], r["test_acc"]) for r in rows if "test_acc" in r and "event" not in r],
            "events": [(e["step"], e["world_size"]) for e in events]}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v).replace(" ", "")


def report(rows: list[dict], a) -> list[str]:
    """The per-algorithm comparison and the goals, each met or not met."""
    out = []
    kills = [r for r in rows if r["killed_at"] is not None]
    for algorithm, _ in ALGORITHMS:
        straight = [r["final_acc"] for r in rows if r["algorithm"] == algorithm and r["killed_at"] is None]
        lossy = [r["final_acc"] for r in kills if r["algorithm"] == algorithm]
        if straight and lossy:
            d = [x - y for x, y in zip(lossy, straight)]
            sd = f" (sd {statistics.stdev(d):.2f}, per seed {', '.join(f'{x:+.2f}' for x in d)})" if len(d) > 1 else ""
            out.append(f"{algorithm}: final accuracy {statistics.mean(straight):.2f} uninterrupted, "
                       f"{statistics.mean(lossy):.2f} with the loss: {statistics.mean(d):+.2f} pt over "
                       f"{len(d)} seed(s){sd}")
    if not kills:
        return out
    secs = sorted(r["loss_to_round_s"] for r in kills if r["loss_to_round_s"] is not None)
    stalls = sorted(r["seconds_lost"] for r in kills if r["seconds_lost"] is not None)
    redone = max((r["steps_redone"] or 0) for r in kills)
    verdict = {True: "met", False: "NOT met"}
    limit = 1.0 if a.fault == "crash" else 3.0
    if stalls:
        bound = (f"; bench clock from the loss to the round without it (the steps up to that round included, an "
                 f"upper bound): median {statistics.median(secs):.2f} s, range {secs[0]:.2f}-{secs[-1]:.2f} s"
                 if secs else "")
        out.append(f"goal: {a.fault} -> the survivors' stall <= {limit:g} s (the record's seconds lost to the change: "
                   f"its quorum and failed attempts): median {statistics.median(stalls):.2f} s, range "
                   f"{stalls[0]:.2f}-{stalls[-1]:.2f} s: {verdict[stalls[-1] <= limit]}{bound}")
    out.append(f"goal: steps redone 0: at most {redone}: {verdict[redone == 0]}")
    for algorithm, want in (("risgd", 1.0), ("prsgd", 1 - 1 / max(a.nodes, 1))):
        cov = sorted({r["coverage_after"] for r in kills if r["algorithm"] == algorithm})
        if cov:
            out.append(f"goal: coverage after the loss, {algorithm}: {cov} (expected {want:.3f}): "
                       f"{verdict[all(abs(c - want) < 1e-3 for c in cov)]}")
    risgd = [r for r in rows if r["algorithm"] == "risgd"]
    pairs = [(k["final_acc"], s["final_acc"]) for k in risgd if k["killed_at"] is not None
             for s in risgd if s["killed_at"] is None and s["seed"] == k["seed"]]
    if pairs:
        d = statistics.mean(x - y for x, y in pairs)
        out.append(f"goal: RI-SGD within 0.5 pt of its uninterrupted run ({len(pairs)} seed(s)): {d:+.2f} pt: "
                   f"{verdict[abs(d) <= 0.5 and len(pairs) >= 3]}" + ("" if len(pairs) >= 3 else " (fewer than 3)"))
    good = [r["goodput"] for r in kills if r["goodput"] is not None]
    lost_s = [r["seconds_lost"] for r in kills if r["seconds_lost"] is not None]
    if good:
        need = f"; at {statistics.median(lost_s):.2f} s lost per run, 97% needs a run of >= " \
               f"{statistics.median(lost_s) / 0.03:.0f} s" if lost_s else ""
        out.append(f"goal: goodput >= 97% (the record's seconds lost): median {100 * statistics.median(good):.1f}% "
                   f"over runs of {statistics.median(r['wall_s'] for r in kills):.0f} s wall{need}: "
                   f"{verdict[statistics.median(good) >= 0.97]}")
    equal = [r["digests_equal"] for r in kills]
    late = sum(1 for r in kills if not r["rejoined"])
    out.append(f"goal: every node's final model equal (the rejoined one too): {sum(equal)}/{len(equal)} runs: "
               f"{verdict[all(equal)]}" + (f" ({late} run(s) ended before the lost node was back)" if late else ""))
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ALGORITHMS), figsize=(12, 4.5), sharey=True)
    for ax, (algorithm, _) in zip(axes, ALGORITHMS):
        for r in (r for r in rows if r["algorithm"] == algorithm):
            style = "-" if r["killed_at"] is not None else ":"
            (line,) = ax.plot(*zip(*r["curve"]), style, lw=1.2,
                              label=f"s{r['seed']} {'lost+rejoin' if r['killed_at'] is not None else 'uninterrupted'}")
            for step, world in r["events"][1:]:
                ax.axvline(step, color=line.get_color(), lw=0.6, alpha=0.6)
                ax.annotate(f"{world}w", (step, 0.02), xycoords=("data", "axes fraction"), fontsize=7,
                            color=line.get_color())
        ax.set_title(f"{algorithm}: test accuracy; lines: membership changes (live workers)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--netns", action="store_true", help="namespace hosts with shaped links (root), not loopback")
    ap.add_argument("--nodes", type=int, default=None, help="nodes (default 4 with --netns, else 3)")
    ap.add_argument("--bandwidth-mbit", type=float, default=1000.0, help="--netns: each host's link")
    ap.add_argument("--ranks-per-node", type=int, default=1,
                    help="each node's ranks (the node level: node_size is the launch's ranks)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more trainer overrides for every run, e.g. overlap=true compress=int8")
    ap.add_argument("--algorithm", choices=[alg for alg, _ in ALGORITHMS], default=None,
                    help="only this algorithm (default both)")
    ap.add_argument("--losses-only", action="store_true", help="only the runs with a loss (no uninterrupted ones)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--kill-at", type=int, default=None,
                    help="the step at which the node is lost (default: drawn per seed from 20-40%% of the run)")
    ap.add_argument("--rejoin-after", type=int, default=None,
                    help="steps on the survivors before the node comes back (default 10%% of the run; -1: never)")
    ap.add_argument("--tau", type=int, default=25)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--fault", choices=("crash", "power"), default="crash",
                    help="crash: the node's processes killed (link up); power (--netns): link down, then killed")
    ap.add_argument("--op-timeout", type=float, default=2.0,
                    help="elastic.op_timeout_s: how long a cross-node operation waits for a silent peer")
    ap.add_argument("--heartbeat-ms", type=int, default=1000, help="the lighthouse's heartbeat timeout")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    ap.add_argument("--out", default=None, help="default runs/bench-elastic[-netns]")
    ap.add_argument("--plot", default=None, help="PNG of accuracy against step (default OUT/elastic.png)")
    a = ap.parse_args(argv)
    seeds = [a.seed] if a.seed is not None else a.seeds
    a.nodes = a.nodes or (4 if a.netns else 3)
    rejoin = a.rejoin_after if a.rejoin_after is not None else a.steps // 10
    a.rejoin_after = None if rejoin < 0 else rejoin
    from risgd_data.make_shards import make_shards

    out = os.path.abspath(a.out or ("runs/bench-elastic-netns" if a.netns else "runs/bench-elastic"))
    shards = os.path.join(out, "shards")
    if not os.path.exists(os.path.join(shards, "index.json")):
        make_shards("digits", shards, shard_size=250, seed=0, progress=False)
    nodes = NetnsNodes(a.nodes, out, a.bandwidth_mbit) if a.netns else LoopbackNodes(a.nodes, out)
    nodes.ranks = a.ranks_per_node
    where = (f"{a.nodes} namespace hosts at {a.bandwidth_mbit:g} Mbit/s" if a.netns else f"{a.nodes} loopback nodes")
    where += f" x {a.ranks_per_node} rank(s){' ' + ' '.join(a.set) if a.set else ''}"
    if a.fault == "power" and not a.netns:
        raise SystemExit("error: --fault power needs --netns (a link to take down)")
    print(f"{where}; digits label-sorted, {a.steps} steps, tau={a.tau}, checkpoint_every={a.checkpoint_every}, "
          f"{a.fault}, op_timeout_s={a.op_timeout:g}, heartbeat {a.heartbeat_ms} ms, rejoin after {a.rejoin_after} "
          f"steps; load {os.getloadavg()[0]:.1f}", flush=True)
    rows, fixed_kill = [], a.kill_at
    from risgd_hosts.netns_cluster import torn_down_on_exit

    with torn_down_on_exit(nodes.cluster) if a.netns else contextlib.nullcontext():
        manifests = {alg: nodes.prepare(alg, shards, mu) for alg, mu in ALGORITHMS if a.algorithm in (None, alg)}
        for seed in seeds:
            kill = fixed_kill if fixed_kill is not None else random.Random(seed).randint(a.steps // 5, 2 * a.steps // 5)
            for algorithm, mu in ALGORITHMS:
                if a.algorithm and algorithm != a.algorithm:
                    continue
                for k in ((kill,) if a.losses_only else (None, kill)):
                    a.seed, a.kill_at = seed, k
                    name = f"{algorithm}-{'kill' if k is not None else 'straight'}-s{seed}"
                    rows.append(run(name, algorithm, mu, nodes, manifests[algorithm], out, a))
                    print(json.dumps({c: v for c, v in rows[-1].items() if c not in ("curve", "events")}), flush=True)
    cols = ("run", "killed_at", "lost_at_round", "loss_to_round_s", "steps_redone", "coverage_after",
            "rejoin_to_round_s", "world_sizes", "seconds_lost", "goodput", "rejoined", "digests_equal", "final_acc",
            "best_acc", "wall_s")
    print("  ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print("  ".join(f"{_fmt(r[c]):>16}" for c in cols))
    for line in report(rows, a):
        print(line)
    png = a.plot or os.path.join(out, "elastic.png")
    plot(rows, png)
    with open(os.path.join(out, "bench_elastic.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"plot: {png}; rows: {os.path.join(out, 'bench_elastic.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
