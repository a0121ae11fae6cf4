"""A storm of faults on an elastic run through the documented commands, on namespace hosts.

    sudo .venv/bin/python benchmarks/bench_storm.py --uninterrupted --steps 6000 --seed 0     # the baseline
    sudo .venv/bin/python benchmarks/bench_storm.py --rate 120 --duration 600 --steps 6000 --seed 0

One ``risgd-elastic`` per node (``python -m risgd_tools.elastic_launch``, torchrun on that node alone,
the trainer on digits label-sorted; risgd_hosts.elastic_local.start_node), each node a network
namespace of a shaped-link switch (risgd_hosts.netns_cluster, root), with its replica filled by
``risgd_data.replicate`` inside it, and one ``torchft_lighthouse`` on a host of its own (so a node's
faults never touch it). Topology ``4x1`` (4 nodes x 1 rank, blocking rounds) or ``3x2`` (3 nodes x 2
ranks: the node level, overlap, int8). Algorithms: RI-SGD mu=0.5 and PR-SGD (elastic.min_coverage=0).

Faults arrive as a Poisson process of ``--rate`` an hour over ``--duration`` seconds of training
(counted from the record's first line; drawn from ``--storm-seed``, default ``--seed``;
``draw_schedule``), each of a kind drawn from ``--kinds``:

- ``crash``: every process of the node SIGKILLed; the same command started 10-30 s later;
- ``power``: its link down, its processes killed; link up and the command again 10-30 s later;
- ``freeze``: SIGSTOP of the node's processes for 5-60 s, then SIGCONT (it must be dropped, and
  healed back when it wakes);
- ``partition``: its link down for 5-30 s, processes alive (dropped, no split brain, healed back);
- ``lighthouse``: the lighthouse killed and started again on the same port 2-10 s later;
- ``overlap``: a node fault, and a second one on another node while the first is being healed.

At most ``--max-down`` nodes are down or being healed at once (a fault is held back until that
holds). A node that exits on its own (no fault of ours) is started again by the bench with the same
command, and counted as a person's intervention. With ``--uninterrupted`` the run has no faults: its
result (wall seconds, final accuracy) is the baseline a storm run of the same topology, algorithm
and steps is compared with (every seed found in ``--out``).

Reported per run: faults by kind; goodput (the baseline's seconds from its first evaluation to its
last over this run's, for the same steps: the time-weighted share of the uninterrupted throughput;
one minus the evaluation gaps beyond the usual one over the run's seconds; and the record's own);
steps redone; every stall over 1 s (a gap between two of the record's evaluations beyond the usual
one, or a membership change's seconds) with its cause; coverage over time; every node's final model
digest; each node fault against the record's live sets; final accuracy against the baseline; and the
sample ledger as far as the run's checkpoints show it (the recording worker's data cursor at each
checkpoint: no chunk's stream position may go back, which would draw a sample twice within a pass;
the trainer writes no per-step sample ids, and the other workers' cursors are not in the
checkpoints). A plot of accuracy and live workers against time with the faults marked. The
machine's load changes the seconds: say it with the figures. ``--report`` prints a saved result's
report again.
Exit status: 0 done (goals met or not: read the report); 2 bad input; 1 the run failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NODE_KINDS = ("crash", "power", "freeze", "partition")
KINDS = (*NODE_KINDS, "lighthouse", "overlap")
# seconds a fault lasts: until the command is started again (crash, power), SIGCONT (freeze), the link up
# (partition), the lighthouse started again
HOLD = {"crash": (10.0, 30.0), "power": (10.0, 30.0), "freeze": (5.0, 60.0), "partition": (5.0, 30.0),
        "lighthouse": (2.0, 10.0)}
TOPOLOGIES = {"4x1": (4, 1, []), "3x2": (3, 2, ["overlap=true", "compress=int8"])}
ALGORITHMS = {"risgd": 0.5, "prsgd": 0.0}


@dataclass
class Fault:
    """One fault: at ``t`` seconds into the run, of ``kind``, on ``node`` (None: the lighthouse), for ``hold`` s;
    ``second`` is True for the second fault of an overlap (drawn inside the first's healing)."""

    t: float
    kind: str
    node: int | None
    hold: float
    second: bool = False

    def end(self, heal_s: float) -> float:
        """When the node is counted up again: back and healed (``heal_s`` after it is started or woken)."""
        return self.t + self.hold + (heal_s if self.node is not None else 0.0)


def poisson_arrivals(rate_per_hour: float, duration_s: float, seed: int, start_s: float = 0.0) -> list[float]:
    """Arrival times of a Poisson process of ``rate_per_hour`` in [start_s, duration_s): exponential gaps."""
    rng, out, t = random.Random(seed), [], start_s
    while (t := t + rng.expovariate(rate_per_hour / 3600.0)) < duration_s:
        out.append(t)
    return out


def draw_schedule(rate_per_hour: float, duration_s: float, seed: int, kinds: list[str] | tuple[str, ...], nodes: int,
                  max_down: int = 1, heal_s: float = 30.0, start_s: float = 10.0) -> list[Fault]:
    """The storm's faults: at the arrivals of a Poisson process of ``rate_per_hour`` in [start_s, duration_s)
    (``poisson_arrivals``), each of a kind drawn from ``kinds`` on a node drawn from those up, its hold drawn from
    HOLD. At most ``max_down`` nodes are down or being healed (``heal_s`` after they are back) at any moment: an
    arrival that would break that is held back until a node is up again (one past ``duration_s`` is dropped); a
    lighthouse fault waits for the last one to end. An ``overlap`` is two node faults on two nodes, the second
    while the first is being healed (it needs max_down >= 2). Reproducible: the same arguments give the same list."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds {bad or '(none)'}: use some of {', '.join(KINDS)}")
    if not rate_per_hour > 0 or not duration_s > 0:
        raise ValueError("rate and duration must be > 0")
    if nodes < 2 or not 1 <= max_down < nodes:
        raise ValueError(f"max_down {max_down} with {nodes} nodes: use 1 to nodes-1 (nodes >= 2)")
    if "overlap" in kinds and max_down < 2:
        raise ValueError("overlap needs max_down >= 2 (two nodes down or healing at once)")
    rng = random.Random(f"{seed}-kinds")  # the arrivals have their own stream: the same whatever the kinds
    node_kinds = [k for k in kinds if k in NODE_KINDS] or list(NODE_KINDS)
    out: list[Fault] = []
    nodes_out: list[Fault] = []  # node faults not yet over (pruned as the arrivals pass their end)
    for arrival in poisson_arrivals(rate_per_hour, duration_s, seed, start_s):
        t = max([arrival, *(f.t for f in out[-1:])])
        nodes_out = [f for f in nodes_out if f.end(heal_s) > t]
        kind = rng.choice(list(kinds))
        if kind == "lighthouse":
            t = max([t, *(f.end(heal_s) for f in out if f.node is None)])
            if t < duration_s:
                out.append(Fault(t, kind, None, rng.uniform(*HOLD[kind])))
            continue
        need = 2 if kind == "overlap" else 1
        while True:  # held back until enough nodes are up
            down = [f for f in nodes_out if f.t <= t < f.end(heal_s)]
            if max_down - len(down) >= need:
                break
            t = min(f.end(heal_s) for f in down)
        if t >= duration_s:
            continue
        busy = {f.node for f in nodes_out if f.t <= t < f.end(heal_s)}
        first_kind = rng.choice(node_kinds) if kind == "overlap" else kind
        node = rng.choice([k for k in range(nodes) if k not in busy])
        first = Fault(t, first_kind, node, rng.uniform(*HOLD[first_kind]))
        out.append(first)
        nodes_out.append(first)
        if kind == "overlap":
            k2 = rng.choice(node_kinds)
            node2 = rng.choice([k for k in range(nodes) if k not in busy | {node}])
            out.append(Fault(first.t + first.hold + rng.uniform(0.5, 0.5 + heal_s / 2), k2, node2,
                             rng.uniform(*HOLD[k2]), True))
            nodes_out.append(out[-1])
    return out


def max_down_at_once(faults: list[Fault], heal_s: float) -> int:
    """The most nodes down or being healed at one moment of the schedule."""
    marks = sorted([(f.t, 1) for f in faults if f.node is not None] +
                   [(f.end(heal_s), -1) for f in faults if f.node is not None], key=lambda m: (m[0], m[1]))
    most = now = 0
    for _, d in marks:
        now += d
        most = max(most, now)
    return most


# -- the hosts -------------------------------------------------------------------------------------------------


class StormHosts:
    """``nodes`` namespace hosts and one more for the lighthouse; the faults, done from outside the nodes."""

    def __init__(self, nodes: int, ranks: int, bandwidth_mbit: float | None, out: str):
        from risgd_hosts.netns_cluster import Cluster

        self.nodes, self.ranks, self.out = nodes, ranks, out
        self.cluster = Cluster(nodes + 1, bandwidth_mbit, tag=f"storm{os.getpid()}")
        self.lh = nodes  # the lighthouse's host
        self.agents: dict[int, subprocess.Popen] = {}  # each node's launcher

    def prepare(self, shards: str, algorithm: str, mu: float) -> tuple[str, list[str]]:
        """The run's manifest (one worker per node) and each node's replica, filled inside its namespace."""
        from risgd_hosts.elastic_local import write_run_manifest

        work = os.path.join(self.out, f"data-{algorithm}")
        manifest = write_run_manifest(shards, work, self.nodes, mu, "label_sorted")
        dirs = []
        for k in range(self.nodes):
            dest = os.path.join(work, f"host{k}")
            cmd = [*self.cluster.exec_prefix(k), sys.executable, "-m", "risgd_data.replicate", "--manifest", manifest,
                   "--source", shards, "--dest", dest, "--node-rank", str(k), "--ranks-per-node", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"host{k}: replicate failed: {proc.stderr.strip()[-300:]}")
            dirs.append(dest)
        return manifest, dirs

    def pids(self, k: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.cluster.ns(k)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def signal_all(self, k: int, sig: int) -> int:
        n = 0
        for pid in self.pids(k):
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
        return n

    def link(self, k: int, state: str) -> None:
        subprocess.run(["ip", "-n", self.cluster.ns(k), "link", "set", "eth0", state], check=True)

    def kill(self, k: int) -> None:
        """Every process of the node, SIGKILL (a stopped one too)."""
        from risgd_hosts.elastic_local import kill_node

        for _ in range(3):
            if not self.signal_all(k, signal.SIGKILL):
                break
            time.sleep(0.1)
        node = self.agents.get(k)
        if node is not None:
            kill_node(node)  # reaped


# -- one run ---------------------------------------------------------------------------------------------------


class Run:
    """One elastic run under a storm (``faults`` empty: uninterrupted), watched from outside."""

    def __init__(self, hosts: StormHosts, a: argparse.Namespace, algorithm: str, manifest: str, dirs: list[str],
                 faults: list[Fault], name: str):
        self.h, self.a, self.algorithm, self.dirs, self.faults, self.name = hosts, a, algorithm, dirs, faults, name
        nodes, ranks, extra = TOPOLOGIES[a.topology]
        self.args = ["--recipe", "recipes/digits.yaml", f"algorithm={algorithm}", f"mu={ALGORITHMS[algorithm]}",
                     f"steps={a.steps}", f"tau={a.tau}", f"eval_every={a.eval_every}", f"seed={a.seed}",
                     "wandb.enabled=false", f"elastic.workers={nodes}", "elastic.min_coverage=0",
                     f"elastic.op_timeout_s={a.op_timeout}", f"data.manifest={manifest}", f"runs_dir={a.out}",
                     f"run_name={name}", *extra, *a.set]
        self.run_dir, self.logs = os.path.join(a.out, name), os.path.join(a.out, f"{name}-logs")
        os.makedirs(self.logs, exist_ok=True)
        self.log: list[dict] = []  # what the bench did and saw, on its clock
        self.seen: dict[int, float] = {}  # metrics.jsonl line -> when the bench first saw it

    def note(self, **e) -> None:
        e["t"] = time.time() - self.t0
        self.log.append(e)
        print(f"  [{e['t']:7.1f} s] " + " ".join(f"{k}={v}" for k, v in e.items() if k != "t"), flush=True)

    # the lighthouse and the nodes

    def start_lighthouse(self) -> None:
        from risgd_hosts.live_cluster import lighthouse_command, wait_port

        prefix = self.h.cluster.exec_prefix(self.h.lh)
        self.lighthouse = subprocess.Popen([*prefix, *lighthouse_command(self.port, heartbeat_ms=self.a.heartbeat_ms)],
                                           stdout=subprocess.DEVNULL,
                                           stderr=open(os.path.join(self.logs, "lighthouse.err"), "a"))
        wait_port(self.port, prefix, process=self.lighthouse)

    def start(self, k: int) -> None:
        from risgd_hosts.elastic_local import start_node

        c = self.h.cluster
        self.h.link(k, "up")
        self.h.agents[k] = start_node(k, self.dirs[k], f"http://{c.addr(self.h.lh)}:{self.port}", self.args,
                                      self.logs, ranks=self.h.ranks, prefix=c.exec_prefix(k), addr=c.addr(k),
                                      env_extra={"GLOO_SOCKET_IFNAME": "eth0"})

    def inject(self, f: Fault) -> list[tuple[float, str, int | None]]:
        """Do a fault; what is to be done when it ends: [(time, action, node)]."""
        k, end = f.node, time.time() - self.t0 + f.hold
        self.note(event="fault", kind=f.kind, node=k, hold=round(f.hold, 1), second=f.second)
        if f.kind == "lighthouse":
            self.lighthouse.kill()
            self.lighthouse.wait()
            return [(end, "lighthouse", None)]
        if f.kind == "crash":
            self.h.kill(k)
            return [(end, "start", k)]
        if f.kind == "power":
            self.h.link(k, "down")
            self.h.kill(k)
            return [(end, "start", k)]
        if f.kind == "freeze":
            self.h.signal_all(k, signal.SIGSTOP)
            return [(end, "thaw", k)]
        self.h.link(k, "down")  # partition
        return [(end, "link-up", k)]

    def finish_fault(self, action: str, k: int | None) -> None:
        self.note(event="back", action=action, node=k)
        if action == "lighthouse":
            self.start_lighthouse()
        elif action == "start":
            self.start(k)
        elif action == "thaw":
            self.h.signal_all(k, signal.SIGCONT)
        else:
            self.h.link(k, "up")

    def poll_metrics(self) -> list[dict]:
        from risgd_hosts.live_cluster import read_jsonl

        rows = read_jsonl(os.path.join(self.run_dir, "metrics.jsonl"))
        now = time.time() - self.t0
        for i in range(len(rows)):
            self.seen.setdefault(i, now)
        return rows

    def go(self) -> dict:
        from risgd_common.ports import free_port

        nodes = self.h.nodes
        self.port, self.t0 = free_port(), time.time()
        self.start_lighthouse()
        for k in range(nodes):
            self.start(k)
        pending = sorted((f.t, "fault", f) for f in self.faults)  # (time, what, fault or node)
        ready = None  # the storm's clock starts at the record's first line (the nodes are up and training)
        held: set[int] = set()  # nodes a fault of ours holds down (their exits are ours)
        done: set[int] = set()  # nodes that finished (exit 0)
        interventions = []
        try:
            while len(done) < nodes:
                time.sleep(0.2)
                now = time.time() - self.t0
                if self.poll_metrics() and ready is None:
                    ready = now
                    self.note(event="training")
                    pending = [(t + ready if what == "fault" else t, what, x) for t, what, x in pending]
                if now > self.a.timeout:
                    raise RuntimeError(f"run {self.name} did not finish within {self.a.timeout:g} s: see {self.logs}")
                while ready is not None and pending and pending[0][0] <= now and not done:
                    _, what, x = pending.pop(0)
                    if what == "fault":
                        for end, action, k in self.inject(x):
                            pending.append((end, action, k))
                            if k is not None:
                                held.add(k)
                        pending.sort(key=lambda p: p[0])
                    else:
                        self.finish_fault(what, x)
                        held.discard(x)
                for k, agent in list(self.h.agents.items()):
                    if k in held or k in done or agent.poll() is None:
                        continue
                    if agent.returncode == 0:
                        done.add(k)
                        self.note(event="finished", node=k)
                    elif done:  # the run ended while it was down or healing: starting it again finds the others gone
                        done.add(k)
                        self.note(event="exited-after-end", node=k, code=agent.returncode)
                    else:  # exited on its own: what a person (or a supervisor) would do, start it again
                        last = _last_line(os.path.join(self.logs, f"node{k}.log"))
                        interventions.append({"t": now, "node": k, "code": agent.returncode, "line": last})
                        self.note(event="exited", node=k, code=agent.returncode, line=last[:160])
                        self.start(k)
        finally:
            for k in range(nodes):
                self.h.signal_all(k, signal.SIGCONT)
                self.h.kill(k)
            self.h.agents.clear()
            self.lighthouse.kill()
            self.lighthouse.wait()
        self.wall = time.time() - self.t0
        self.not_injected = [asdict(x) for t, what, x in pending if what == "fault"]
        return self.result(interventions)

    # what the run left

    def result(self, interventions: list[dict]) -> dict:
        from risgd_hosts.live_cluster import read_jsonl

        rows = read_jsonl(os.path.join(self.run_dir, "metrics.jsonl"))
        summary = _read_json(os.path.join(self.run_dir, "summary.json"), {})
        evals = [dict(r, bench_t=self.seen.get(i)) for i, r in enumerate(rows) if "test_acc" in r]
        events = [dict(r, bench_t=self.seen.get(i)) for i, r in enumerate(rows) if r.get("event") == "membership"]
        finals = {k: _read_json(os.path.join(self.run_dir, "elastic", f"final-w{k:05d}.json"), {}).get("model_sha256")
                  for k in range(self.h.nodes)}
        steps = [r["step"] for r in evals]
        redone = sum(1 for x, y in zip(steps, steps[1:]) if y <= x)
        faults = [e for e in self.log if e["event"] == "fault"]
        return {"name": self.name, "algorithm": self.algorithm, "seed": self.a.seed, "topology": self.a.topology,
                "steps": self.a.steps, "uninterrupted": not self.faults, "wall_s": self.wall,
                "first_eval_t": evals[0]["bench_t"] if evals else None,
                "last_t": evals[-1]["bench_t"] if evals else None,
                "final_acc": summary.get("final_test_acc"), "record_goodput": summary.get("goodput"),
                "record_seconds_lost": summary.get("seconds_lost"), "steps_redone_record": summary.get("steps_redone"),
                "steps_redone_evals": redone, "finals": finals, "interventions": interventions,
                "faults": faults, "log": self.log, "not_injected": self.not_injected,
                "faults_planned": [asdict(f) for f in self.faults],
                "evals": [{"step": r["step"], "acc": r["test_acc"], "t": r["bench_t"],
                           "coverage": r.get("data_coverage")} for r in evals],
                "events": [{"step": e["step"], "t": e["bench_t"], "live": e["live_workers"],
                            "lost": e["lost_workers"], "joined": e["joined_workers"],
                            "coverage": e["data_coverage"],
                            "seconds": e["quorum_seconds"] + e["failed_seconds"]} for e in events],
                "ledger": ledger(self.run_dir), "summary_found": bool(summary)}


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [x.strip() for x in f.read().splitlines()[-40:] if x.strip()]
    except OSError:
        return ""
    errs = [x for x in lines if x.startswith("error:") or "Error" in x]
    return (errs or lines or [""])[-1]


def _read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def ledger(run_dir: str) -> dict:
    """The sample ledger as far as the checkpoints show it: each checkpoint's data cursor (the recording worker's
    chunk stream positions at that step). For each worker, in step order, a chunk's position must never go back
    (a position drawn again is a sample drawn twice within its pass). Returns the cursors' count, the workers seen
    and every place a position went back."""
    import torch

    cursors = []
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "step*", "*model_states.pt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a file being written when the run was stopped
            continue
        cur = state.get("data_cursor") if isinstance(state, dict) else None
        if cur:
            cursors.append(cur)
    back = []
    by_worker: dict[int, list[dict]] = {}
    for c in sorted(cursors, key=lambda c: c["step"]):
        by_worker.setdefault(int(c["worker"]), []).append(c)
    for w, cs in by_worker.items():
        for x, y in zip(cs, cs[1:]):
            for chunk, pos in y["positions"].items():
                if pos < x["positions"].get(chunk, 0):
                    back.append({"worker": w, "chunk": int(chunk), "from_step": x["step"], "to_step": y["step"],
                                 "position": x["positions"][chunk], "then": pos})
    return {"cursors": len(cursors), "workers": sorted(by_worker), "went_back": back}


# -- the report ------------------------------------------------------------------------------------------------


def stalls(r: dict, heal_s: float) -> list[dict]:
    """Gaps between two of the record's evaluations (bench clock) more than 1 s beyond the median gap, and
    membership changes whose quorum and failed attempts took over 1 s; each with the fault that explains it."""
    out = []
    ev = [e for e in r["evals"] if e["t"] is not None]
    gaps = [(b["t"] - a["t"], a, b) for a, b in zip(ev, ev[1:])]
    usual = statistics.median([g for g, *_ in gaps]) if gaps else 0.0
    for g, a, b in gaps:
        if g - usual > 1.0:
            out.append({"t": a["t"], "seconds": g - usual, "what": f"steps {a['step']}-{b['step']}",
                        "cause": cause(r, a["t"], b["t"], heal_s)})
    for e in r["events"]:
        if e["seconds"] > 1.0:
            out.append({"t": e["t"], "seconds": e["seconds"], "what": f"membership change at step {e['step']}",
                        "cause": cause(r, (e["t"] or 0) - 5, e["t"] or 0, heal_s)})
    return out


def cause(r: dict, lo: float, hi: float, heal_s: float) -> str:
    # a lighthouse loss reaches as far as the quorum the nodes wait on (elastic.quorum_timeout_s, 60 s) and their
    # start again after it
    hits = [f for f in r["faults"] if f["t"] <= hi and f["t"] + f["hold"] + (heal_s if f["node"] is not None else
                                                                              60 + heal_s) >= lo]
    if not hits:
        return "none of ours (evaluation, checkpoint or the machine's load)"
    return ", ".join(f"{f['kind']}" + (f" node {f['node']}" if f["node"] is not None else "") + f" at {f['t']:.0f} s"
                     for f in hits)


def report(r: dict, base: list[dict], heal_s: float) -> list[str]:
    out = []
    kinds: dict[str, int] = {}
    for f in r["faults"]:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    lost = [e for e in r["events"] if e["lost"]]
    joined = [e for e in r["events"] if e["joined"]]
    node_faults = [f for f in r["faults"] if f["node"] is not None]
    late = r.get("not_injected") or []
    out.append(f"{r['name']}: {len(r['faults'])} faults {kinds}" + (f" ({len(late)} more drawn, after the run's end)"
                                                                     if late else "") +
               f", wall {r['wall_s']:.0f} s; membership events: "
               f"{len(lost)} with a loss ({sum(len(e['lost']) for e in lost)} nodes), {len(joined)} with a join "
               f"({sum(len(e['joined']) for e in joined)} nodes), against {len(node_faults)} node faults")
    same = [b for b in base if b["algorithm"] == r["algorithm"] and b["steps"] == r["steps"]]
    span = (r["last_t"] or 0) - (r["first_eval_t"] or 0)
    if same and span > 0:
        bspan = statistics.mean(b["last_t"] - b["first_eval_t"] for b in same)
        r["goodput"] = bspan / span
        out.append(f"  goodput {100 * r['goodput']:.1f}% (the baseline's {bspan:.0f} s from the first evaluation to "
                   f"the last, over this run's {span:.0f} s; {len(same)} baseline run(s)); the record's own "
                   f"{r['record_goodput']}")
    else:
        r["goodput"] = None
        out.append(f"  goodput: no baseline of {r['algorithm']} at {r['steps']} steps in the out directory; the "
                   f"record's own {r['record_goodput']}")
    out.append(f"  steps redone: record {r['steps_redone_record']}, evaluations seen again "
               f"{r['steps_redone_evals']}")
    st = stalls(r, heal_s)
    gap_s = sum(x["seconds"] for x in st if x["what"].startswith("steps"))
    r["goodput_stalls"] = 1 - gap_s / span if span > 0 else None
    out.append(f"  goodput from the stalls: {100 * r['goodput_stalls']:.1f}% ({gap_s:.1f} s of evaluation gaps beyond "
               f"the usual one, over {span:.0f} s; the machine's speed cancels out)" if span > 0 else "")
    out.append(f"  stalls over 1 s: {len(st)}")
    out.extend(f"    {s['t']:7.1f} s  {s['seconds']:5.1f} s  {s['what']}: {s['cause']}" for s in st)
    cov = [(round(e["t"] or 0), e["coverage"], len(e["live"])) for e in r["events"]]
    out.append(f"  coverage over time (s, coverage, live workers): {cov}")
    digests = set(r["finals"].values())
    equal = len(digests) == 1 and None not in digests
    out.append(f"  final models: {r['finals']} -> {'equal' if equal else 'NOT equal'}")
    accs = [b["final_acc"] for b in same if b["final_acc"] is not None]
    if accs and r["final_acc"] is not None:
        out.append(f"  final accuracy {r['final_acc']:.2f} against the baseline's {accs} (spread "
                   f"{min(accs):.2f}-{max(accs):.2f})")
    led = r["ledger"]
    out.append(f"  ledger: {led['cursors']} checkpoint cursors of workers {led['workers']}; positions that went back: "
               f"{led['went_back'] or 'none'}")
    rec = record_faults(r, heal_s)
    out.extend(f"  record: {m}" for m in rec["missed"] + rec["inconsistent"])
    out.append(f"  interventions (a node that exited on its own, started again by the bench): "
               f"{[(round(i['t']), i['node'], i['code'], i['line'][:100]) for i in r['interventions']] or 'none'}")
    return out


def record_faults(r: dict, heal_s: float) -> dict:
    """Each node fault against the record's live sets (bench clock): ``dropped`` if the node is out of a live
    set seen after the fault began and before it was back and healed (``heal_s``; a node already out counts),
    ``back`` if a later live set, before that node's next fault, holds it again. And the record's events whose
    ``lost``/``joined`` lists are not the difference of two successive live sets (the recording node changed,
    or it counts from its own last view)."""
    ev = [e for e in r["events"] if e["t"] is not None]
    out = {"injected": 0, "dropped": 0, "back": 0, "missed": [], "inconsistent": []}
    for f in r["faults"]:
        if f["node"] is None:
            continue
        out["injected"] += 1
        before = [e for e in ev if e["t"] <= f["t"]]
        window = [e for e in ev if f["t"] <= e["t"] <= f["t"] + f["hold"] + heal_s + 30]
        out_of = (before and f["node"] not in before[-1]["live"]) or any(f["node"] not in e["live"] for e in window)
        if out_of:
            out["dropped"] += 1
            first = next((i for i, e in enumerate(ev) if e["t"] >= f["t"] and f["node"] not in e["live"]), None)
            nxt = min([g["t"] for g in r["faults"] if g["node"] == f["node"] and g["t"] > f["t"]], default=1e18)
            if any(f["node"] in e["live"] for e in ev[(first or 0):] if f["t"] + f["hold"] <= e["t"] < nxt):
                out["back"] += 1
            else:
                out["missed"].append(f"{f['kind']} node {f['node']} at {f['t']:.0f} s: not back in the record"
                                     + (" before its next fault" if nxt < 1e18 else ""))
        else:
            out["missed"].append(f"{f['kind']} node {f['node']} at {f['t']:.0f} s: never out of the record's live set")
    for a, b in zip(ev, ev[1:]):
        lost, joined = sorted(set(a["live"]) - set(b["live"])), sorted(set(b["live"]) - set(a["live"]))
        if lost != sorted(b["lost"]) or joined != sorted(b["joined"]):
            out["inconsistent"].append(f"step {b['step']}: live {a['live']} -> {b['live']} recorded as lost "
                                       f"{b['lost']}, joined {b['joined']}")
    return out


def goals(r: dict, base: list[dict], heal_s: float = 30.0) -> list[str]:
    verdict = {True: "met", False: "NOT met", None: "not checked"}
    same = [b["final_acc"] for b in base if b["algorithm"] == r["algorithm"] and b["steps"] == r["steps"]
            and b["final_acc"] is not None]
    digests = set(r["finals"].values())
    rec = record_faults(r, heal_s)
    within = None
    if len(same) >= 2 and r["final_acc"] is not None:
        within = min(same) <= r["final_acc"] <= max(same)
    good = [x for x in (r.get("goodput"), r.get("goodput_stalls")) if x is not None]
    g = [("goodput >= 95%, against the baseline's throughput and from the stalls (both)"
          + (" (RI-SGD)" if r["algorithm"] == "risgd" else ""), None if len(good) < 2 else min(good) >= 0.95),
         ("every node's final model equal", len(digests) == 1 and None not in digests),
         (f"every node fault dropped and healed back in the record ({rec['dropped']} dropped, {rec['back']} back, "
          f"of {rec['injected']})", rec["dropped"] == rec["back"] == rec["injected"]),
         (f"the record's events equal its live sets' changes ({len(rec['inconsistent'])} not)",
          not rec["inconsistent"]),
         ("the ledger: no stream position went back (the recording worker's cursors only)",
          None if not r["ledger"]["cursors"] else not r["ledger"]["went_back"]),
         (f"final accuracy within the baseline's seed spread ({len(same)} seed(s); needs >= 2)", within),
         ("the run never needed a person", not r["interventions"] and r["summary_found"])]
    return [f"  goal {verdict[ok]:11} {name}" for name, ok in g]


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    ev = [e for e in r["evals"] if e["t"] is not None]
    ax.plot([e["t"] for e in ev], [e["acc"] for e in ev], "-", color="k", lw=1.2, label="test accuracy (%)")
    ax.set_xlabel("seconds (bench clock)")
    ax.set_ylabel("test accuracy (%)")
    ax2 = ax.twinx()
    ts = [e for e in r["events"] if e["t"] is not None]
    if ts:
        xs = [e["t"] for e in ts] + [r["wall_s"]]
        ys = [len(e["live"]) for e in ts]
        ax2.step(xs, ys + ys[-1:], where="post", color="tab:blue", lw=1.5, label="live workers")
    ax2.set_ylabel("live workers (record)")
    ax2.set_ylim(0, TOPOLOGIES[r["topology"]][0] + 0.5)
    colors = {"crash": "tab:red", "power": "tab:orange", "freeze": "tab:cyan", "partition": "tab:purple",
              "lighthouse": "tab:green"}
    for f in r["faults"]:
        ax.axvspan(f["t"], f["t"] + f["hold"], color=colors[f["kind"]], alpha=0.25, lw=0)
        ax.annotate(f"{f['kind']}" + (f" n{f['node']}" if f["node"] is not None else ""), (f["t"], 0.02),
                    xycoords=("data", "axes fraction"), fontsize=7, rotation=90, color=colors[f["kind"]])
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [x.get_label() for x in lines], loc="lower right", fontsize=8)
    ax.set_title(f"{r['name']}: accuracy, live workers; shaded: faults (until the node is started again / woken / "
                 f"its link up)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- the command -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=120.0, help="faults an hour (a Poisson process; default 120)")
    p.add_argument("--duration", type=float, default=600.0,
                   help="seconds of the run in which faults arrive (default 600); give --steps enough for the run "
                        "to last beyond it, so that every node is back before the end")
    p.add_argument("--steps", type=int, default=6000, help="the run's steps (the same for the baseline)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (and the storm's, unless --storm-seed)")
    p.add_argument("--storm-seed", type=int, default=None, help="the storm's seed (default: --seed)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), help=f"fault kinds, of {', '.join(KINDS)}")
    p.add_argument("--topology", choices=list(TOPOLOGIES), default="4x1",
                   help="4x1: 4 nodes x 1 rank; 3x2: 3 nodes x 2 ranks, the node level, overlap, int8")
    p.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), default=["risgd"],
                   help="risgd (mu=0.5) and/or prsgd; one run each, with the same storm")
    p.add_argument("--uninterrupted", action="store_true", help="the baseline: the same runs without faults")
    p.add_argument("--max-down", type=int, default=2, help="nodes down or healing at once, at most (default 2)")
    p.add_argument("--heal-s", type=float, default=30.0,
                   help="seconds a node counts as healing after it is back, for --max-down (default 30)")
    p.add_argument("--tau", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=25, help="evaluations (and checkpoints): the record's clock")
    p.add_argument("--op-timeout", type=float, default=2.0, help="elastic.op_timeout_s")
    p.add_argument("--heartbeat-ms", type=int, default=1000, help="the lighthouse's heartbeat timeout")
    p.add_argument("--bandwidth-mbit", type=float, default=1000.0, help="each host's link")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more trainer overrides")
    p.add_argument("--timeout", type=float, default=3600.0, help="give a run up after this many seconds")
    p.add_argument("--report", nargs="+", default=None, metavar="RESULT_JSON",
                   help="no run: print the report and plot of these results again (the baselines from --out)")
    p.add_argument("--out", default="runs/bench-storm", help="work directory (runs, logs, results, plots)")
    a = p.parse_args(argv)
    bad = [k for k in a.kinds if k not in KINDS]
    nodes = TOPOLOGIES[a.topology][0]
    if bad:
        p.exit(2, f"error: --kinds {' '.join(bad)}: use some of {', '.join(KINDS)}\n")
    if not a.rate > 0 or not a.duration > 0 or a.steps < 1:
        p.exit(2, "error: --rate, --duration and --steps must be > 0\n")
    if not 1 <= a.max_down < nodes or ("overlap" in a.kinds and a.max_down < 2):
        p.exit(2, f"error: --max-down {a.max_down}: use 1 to {nodes - 1} ({a.topology}), 2 or more with overlap\n")
    a.out = os.path.abspath(a.out)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        missing = [p for p in a.report if _read_json(p, None) is None]
        if missing:
            print(f"error: --report {missing[0]}: not a result of this bench (its OUT/NAME.json)", file=sys.stderr)
            return 2
        return show([_read_json(p, None) for p in a.report], a)
    from risgd_hosts.netns_cluster import netns_available, torn_down_on_exit

    why = netns_available()
    if why:
        print(f"error: namespace hosts are needed: {why} (run it with sudo)", file=sys.stderr)
        return 1
    from risgd_data.make_shards import make_shards

    shards = os.path.join(a.out, "shards")
    if not os.path.exists(os.path.join(shards, "index.json")):
        make_shards("digits", shards, shard_size=250, seed=0, progress=False)
    nodes, ranks, _ = TOPOLOGIES[a.topology]
    storm_seed = a.seed if a.storm_seed is None else a.storm_seed
    faults = [] if a.uninterrupted else draw_schedule(a.rate, a.duration, storm_seed, a.kinds, nodes, a.max_down,
                                                      a.heal_s)
    print(f"{a.topology} on namespace hosts at {a.bandwidth_mbit:g} Mbit/s; {a.steps} steps, tau={a.tau}; "
          + ("uninterrupted" if a.uninterrupted else
             f"{len(faults)} faults drawn at {a.rate:g}/h over {a.duration:g} s of training (storm seed {storm_seed}, "
             f"kinds "
             f"{' '.join(a.kinds)}, max {a.max_down} down)") + f"; load {os.getloadavg()[0]:.1f}", flush=True)
    hosts = StormHosts(nodes, ranks, a.bandwidth_mbit, a.out)
    results = []
    with torn_down_on_exit(hosts.cluster):
        for algorithm in a.algorithms:
            manifest, dirs = hosts.prepare(shards, algorithm, ALGORITHMS[algorithm])
            name = f"{a.topology}-{algorithm}-{'straight' if a.uninterrupted else 'storm'}-s{a.seed}"
            r = Run(hosts, a, algorithm, manifest, dirs, faults, name).go()
            with open(os.path.join(a.out, f"{name}.json"), "w") as f:
                json.dump(r, f, indent=1)
            results.append(r)
    return show(results, a)


def show(results: list[dict], a: argparse.Namespace) -> int:
    """Each result's report (and goals), against the baselines in ``a.out``; its plot."""
    base = [b for b in (_read_json(p, None) for p in glob.glob(os.path.join(a.out, f"{a.topology}-*-straight-s*.json")))
            if b]
    for r in results:
        for line in report(r, base, a.heal_s) + ([] if r["uninterrupted"] else goals(r, base, a.heal_s)):
            print(line)
        png = os.path.join(a.out, f"{r['name']}.png")
        plot(r, png)
        print(f"  plot: {png}; result: {os.path.join(a.out, r['name'] + '.json')}; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
