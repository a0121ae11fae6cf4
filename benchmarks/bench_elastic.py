"""A lost node, on real torchrun agents: RI-SGD and PR-SGD, uninterrupted and with one node killed.

    python benchmarks/bench_elastic.py --steps 1000 --kill-at 300 --out runs/bench-elastic

Three torchrun agents on 127.0.0.1 (one per "node", --nproc-per-node 1, risgd_hosts.elastic_local),
digits label-sorted over 3 workers. For each algorithm, the run is done twice: once uninterrupted,
and once with the node serving worker 2 SIGKILLed (the agent and its worker) when that worker
passes step --kill-at. The survivors go on at 2 workers. PR-SGD runs with elastic.min_coverage=0,
so that it keeps training on the 2/3 of the data it still holds. Prints one row per run: the
seconds from the kill to the first step on the survivors, the steps trained again, the coverage
after the loss, goodput, and the final and best test accuracy. One seed; the machine's load
changes the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from risgd_hosts.elastic_local import kill_node, prepare_replicas, start_agent  # noqa: E402
from risgd_hosts.local import free_port  # noqa: E402


def run(name: str, algorithm: str, mu: float, replicas: tuple[str, list[str]], out: str, steps: int,
        kill_at: int | None, tau: int, seed: int) -> dict:
    manifest, dirs = replicas
    args = ["--recipe", "recipes/digits.yaml", f"algorithm={algorithm}", f"mu={mu}", f"steps={steps}", f"tau={tau}",
            "eval_every=100", "checkpoint_every=100", f"seed={seed}", "wandb.enabled=false", "elastic.workers=3",
            "elastic.min_coverage=0", "dist_timeout_s=60", f"data.manifest={manifest}", f"runs_dir={out}",
            f"run_name={name}"]
    run_dir, logs = os.path.join(out, name), os.path.join(out, f"{name}-logs")
    os.makedirs(logs, exist_ok=True)
    port, t0 = free_port(), time.time()
    agents = [start_agent(k, dirs[k], port, args, logs, nnodes="2:3") for k in range(3)]
    beat = os.path.join(run_dir, "elastic", "beat-w00002.json")
    try:
        while any(a.poll() is None for a in agents[:2]):
            time.sleep(0.2)
            if kill_at is not None and agents[2].poll() is None and os.path.exists(beat):
                try:
                    with open(beat) as f:
                        step = json.load(f)["step"]
                except ValueError:
                    continue
                if step >= kill_at:
                    kill_node(agents[2])
    finally:
        for a in agents:
            if a.poll() is None:
                kill_node(a)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        events = [e for e in map(json.loads, f) if e.get("event") == "membership"]
    lost = events[1] if len(events) > 1 else {}
    return {"run": name, "lost_at": lost.get("step", 0) + lost.get("steps_redone", 0) if lost else None,
            "resumed_from": lost.get("step"), "kill_to_step_s": lost.get("seconds_from_failure_to_step"),
            "steps_redone": lost.get("steps_redone"), "coverage_after": lost.get("data_coverage", 1.0),
            "goodput": summary.get("goodput"), "final_acc": summary["final_test_acc"],
            "best_acc": summary["best_test_acc"], "launch_s": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--kill-at", type=int, default=300)
    ap.add_argument("--tau", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench-elastic")
    args = ap.parse_args(argv)
    from risgd_data.make_shards import make_shards

    out = os.path.abspath(args.out)
    shards = os.path.join(out, "shards")
    if not os.path.exists(os.path.join(shards, "index.json")):
        make_shards("digits", shards, shard_size=250, seed=0, progress=False)
    rows = []
    for algorithm, mu in (("risgd", 0.5), ("prsgd", 0.0)):
        replicas = prepare_replicas(shards, os.path.join(out, f"replicas-{algorithm}"), 3, mu, "label_sorted")
        for kill in (None, args.kill_at):
            name = f"{algorithm}-{'kill' if kill is not None else 'straight'}-s{args.seed}"
            rows.append(run(name, algorithm, mu, replicas, out, args.steps, kill, args.tau, args.seed))
            print(json.dumps(rows[-1]), flush=True)
    cols = ("run", "lost_at", "resumed_from", "kill_to_step_s", "steps_redone", "coverage_after", "goodput",
            "final_acc", "best_acc")
    print("  ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>15.3f}" if isinstance(r[c], float) else f"{r[c]!s:>15}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
