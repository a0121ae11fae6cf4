"""A lost node under live recovery (fault_tolerance: torchft), timed from outside the nodes.

    python benchmarks/bench_live.py --repeats 3 --out runs/bench-live

Nodes of ``risgd_hosts.live_node`` (the engine alone: a small MLP, deterministic data per node and
step, steps paced by ``--step-seconds``) with a real ``torchft_lighthouse`` (heartbeat timeout
``--heartbeat-ms``), on 127.0.0.1 (``risgd_hosts.live_cluster``). Two shapes: 4 nodes x 1 rank
(blocking rounds) and 2 nodes x 2 ranks (the node level, overlapped rounds, int8 with error
feedback). For each shape and repeat, one node is lost at a step drawn from 20-40% of the run, by a
crash (its processes SIGKILLed: the others' connections reset) or by a power cut (SIGSTOP: silent,
no reset, no heartbeat; SIGKILLed later); ``--rejoin-after`` seconds later it is started again with
nothing and is healed from a live peer.

Per run, from this process's clock: the stall (the longest gap between two of a survivor's steps
after the loss: its local steps go on, the first round after the loss waits for the lighthouse's
heartbeat timeout or the operation timeout), the seconds from the loss to the first round without
the node, the steps trained twice, the failed round attempts, the
seconds from the rejoining node's start to its first step (most of it the process's start-up), whether
its model after its first round equals the others', and goodput: the share of the run's wall time on
a survivor not lost to the incident (the gap beyond a median step, for the loss and the join). Prints
a row per run and the medians with their spread; the goals of the live-recovery issue each met or not.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from risgd_hosts.live_cluster import LiveCluster, first_step_after  # noqa: E402

SHAPES = {"4x1": (4, ["--ranks", "1"]),
          "2x2-node-overlap-int8": (2, ["--ranks", "2", "--overlap", "--compress", "int8"])}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-live", help="work directory (node logs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--tau", type=int, default=4)
    p.add_argument("--step-seconds", type=float, default=0.04, help="pace of a step (sleep added)")
    p.add_argument("--op-timeout", type=float, default=2.0, help="risgd.op_timeout_s")
    p.add_argument("--heartbeat-ms", type=int, default=1000, help="the lighthouse's heartbeat timeout")
    p.add_argument("--rejoin-after", type=float, default=3.0, help="seconds after the loss the node is started again")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--faults", nargs="+", default=["crash", "power-cut"], choices=["crash", "power-cut"])
    p.add_argument("--netns", action="store_true",
                   help="each node on its own namespace test host (root): a crash is SIGKILL, a power cut its link "
                        "down, then SIGKILL; the lighthouse on host 0")
    p.add_argument("--bandwidth-mbit", type=float, nargs="+", default=[0.0],
                   help="with --netns, the links' rates (0: unshaped); one set of runs per rate")
    return p.parse_args(argv)


def _steps(records):
    return [r for r in records if "loss" in r]


def one_run(args, shape: str, fault: str, seed: int, mbit: float = 0.0) -> dict:
    nodes, extra = SHAPES[shape]
    work = os.path.join(args.out, f"{shape}-{fault}-{seed}" + (f"-{mbit:g}mbit" if args.netns else ""))
    if not args.netns:
        return _run(args, shape, fault, seed, nodes, extra, work, None)
    from risgd_hosts.netns_cluster import Cluster, torn_down_on_exit

    with torn_down_on_exit(Cluster(nodes, mbit or None)) as hosts:
        return _run(args, shape, fault, seed, nodes, extra, work, hosts)


def _run(args, shape, fault, seed, nodes, extra, work, hosts) -> dict:
    rng = random.Random(seed)
    lose_at = rng.randint(int(0.2 * args.steps), int(0.4 * args.steps))
    victim = nodes - 1
    node_args = ["--steps", str(args.steps), "--tau", str(args.tau), "--step-seconds", str(args.step_seconds),
                 "--op-timeout", str(args.op_timeout), "--quorum-timeout", "60", *extra]
    with LiveCluster(work, nodes, node_args, heartbeat_ms=args.heartbeat_ms, hosts=hosts) as c:
        for w in range(nodes):
            c.start(w)
        c.wait_step(victim, lose_at, timeout=300)
        if fault == "crash":
            t_loss = c.kill(victim)
        elif hosts is not None:
            t_loss = c.power_cut(victim)
        else:
            t_loss = c.freeze(victim)
        time.sleep(args.rejoin_after)
        if fault == "power-cut" and hosts is None:
            c.kill(victim)
        t_rejoin = time.time()
        c.start(victim)
        codes = c.wait_all(600)
        recs = {w: c.records(w) for w in range(nodes)}
    survivor = recs[0]
    steps = _steps(survivor)
    times = [r["t"] for r in steps]
    numbers = [r["step"] for r in steps]
    gaps = [b - a for a, b in zip(times, times[1:])]
    median_step = statistics.median(gaps)
    after = first_step_after(survivor, t_loss)
    live = [r for r in recs[victim] if r.get("event") == "live"][-1]
    first_after_join = next((r for r in _steps(recs[victim]) if r["t"] > live["t"]), None)
    # blocking rounds: the joiner's model after its first round against the others' at that step; with overlap
    # the others apply that round later, to their own progress: no model to compare until the end (None)
    join_digest_ok = None if "--overlap" in extra else bool(live.get("healed")) and live.get("digest") == next(
        (r.get("digest") for r in steps if r["step"] == live.get("step")), "missing")
    # the stall: the longest gap between two of a survivor's steps after the loss (local steps go on without
    # the lost node; the first round after it waits for the lighthouse or the operation timeout)
    loss_gap = max((b - a for a, b in zip(times, times[1:]) if b > t_loss and a < t_rejoin), default=float("nan"))
    # goodput: time lost is each gap beyond the usual gap of its kind (a local step, or a step that closes a
    # round, which takes a quorum and the collectives), counted where it exceeds 3x that
    kinds = [numbers[i + 1] % args.tau == 0 for i in range(len(gaps))]
    usual = {k: statistics.median([g for g, kk in zip(gaps, kinds) if kk == k]) for k in (True, False)}
    lost_seconds = sum(g - usual[k] for g, k in zip(gaps, kinds) if g > 3 * usual[k])
    first_round = next((r for r in survivor if r.get("event") == "membership" and r["lost"] == [victim]), None)
    wall = times[-1] - times[0]
    done = [next((r for r in recs[w] if r.get("event") == "done"), None) for w in range(nodes)]
    return {"shape": shape, "fault": fault, "seed": seed, "lose_at": lose_at, "codes": codes,
            "mbit": hosts.bandwidth_mbit if hosts is not None else None,
            "to_next_step": after["t"] - t_loss if after else float("nan"),
            "longest_gap": max(gaps), "loss_gap": loss_gap, "median_step": median_step,
            "usual_round_step": usual[True], "lost_seconds": lost_seconds,
            "to_round_without": first_round["t"] - t_loss if first_round else float("nan"),
            "steps_redone": len(numbers) - len(set(numbers)) + sum(1 for a, b in zip(numbers, numbers[1:]) if b <= a),
            "retries": done[0]["retries"] if done[0] else None,
            "rejoin_to_step": (first_after_join["t"] - t_rejoin) if first_after_join else float("nan"),
            "join_digest_equal": join_digest_ok, "healed_at": live.get("step"),
            "final_digests_equal": len({d["digest"] for d in done if d}) == 1 and all(done),
            "goodput": 1 - lost_seconds / wall if wall > 0 else float("nan"), "wall": wall}


def spread(values):
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    return f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    header = (f"{'shape':24} {'fault':9} {'seed':>4} {'lose@':>5} {'stall s':>7} {'round w/o s':>11} {'redone':>6} "
              f"{'retries':>7} {'rejoin s':>8} {'heal=':>5} {'final=':>6} {'goodput':>7}")
    print(header, flush=True)
    for shape, mbit in [(shape, mbit) for mbit in args.bandwidth_mbit for shape in args.shapes]:
        for fault in args.faults:
            for seed in range(args.repeats):
                r = one_run(args, shape, fault, seed, mbit)
                rows.append(r)
                name = f"{shape}@{mbit:g}Mbit" if args.netns and mbit else shape
                print(f"{name:24} {fault:9} {seed:>4} {r['lose_at']:>5} {r['loss_gap']:>7.2f} "
                      f"{r['to_round_without']:>11.2f} {r['steps_redone']:>6} {r['retries']!s:>7} "
                      f"{r['rejoin_to_step']:>8.1f} "
                      f"{ {True: 'yes', False: 'NO', None: 'n/a'}[r['join_digest_equal']]:>5} "
                      f"{'yes' if r['final_digests_equal'] else 'NO':>6} "
                      f"{r['goodput']:>7.3f}", flush=True)
    print("\nmedians (min, max) over the repeats:")
    for shape, mbit in [(shape, mbit) for mbit in args.bandwidth_mbit for shape in args.shapes]:
        for fault in args.faults:
            sel = [r for r in rows if r["shape"] == shape and r["fault"] == fault and (r["mbit"] or 0) == mbit]
            where = f" at {mbit:g} Mbit/s" if mbit else ""
            print(f"  {shape}{where} {fault}: stall {spread([r['loss_gap'] for r in sel])} s; loss -> first round "
                  f"without the node {spread([r['to_round_without'] for r in sel])} s; a round's step "
                  f"{spread([r['usual_round_step'] for r in sel])} s; "
                  f"goodput {spread([r['goodput'] for r in sel])}; rejoin start -> first step "
                  f"{spread([r['rejoin_to_step'] for r in sel])} s")
    crash = [round(r["loss_gap"], 2) for r in rows if r["fault"] == "crash"]
    cut = [round(r["loss_gap"], 2) for r in rows if r["fault"] == "power-cut"]
    goals = [("crash -> next step <= 1 s (the survivors' stall, every run)", bool(crash) and max(crash) <= 1.0, crash),
             ("power cut -> next step <= 3 s (the survivors' stall, every run)", bool(cut) and max(cut) <= 3.0, cut),
             ("steps redone 0", all(r["steps_redone"] == 0 for r in rows), [r["steps_redone"] for r in rows]),
             ("goodput >= 97% with one loss and one rejoin", all(r["goodput"] >= 0.97 for r in rows),
              [round(r["goodput"], 3) for r in rows]),
             ("the rejoined node's digest equal (blocking rounds)", all(r["join_digest_equal"] is not False
                                                                    for r in rows), None),
             ("every node's final digest equal", all(r["final_digests_equal"] for r in rows), None)]
    lost = [r["lost_seconds"] for r in rows]
    wall = statistics.median(r["wall"] for r in rows)
    need = statistics.median(lost) / 0.03 if lost else float("nan")
    print(f"\ntime lost per run (the loss and the join, beyond usual steps): {spread(lost)} s in runs of "
          f"{wall:.0f} s; goodput >= 97% needs runs of >= {need:.0f} s with one loss and one rejoin")
    where = "namespace hosts" if args.netns else "loopback"
    print(f"goals (the live-recovery issue, on {where}):")
    for name, ok, values in goals:
        print(f"  {'met    ' if ok else 'NOT met'}  {name}" + (f"  {values}" if values is not None and not ok else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
