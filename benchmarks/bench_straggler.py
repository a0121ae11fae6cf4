"""A slow node on 4 test hosts x 1 rank: RI-SGD with a round deadline leaves it behind when the others cover its
data; without the deadline, PR-SGD and SyncSGD go at its pace.

    sudo .venv/bin/python benchmarks/bench_straggler.py                  # 3 seeds, about 45 min on 2 cores
    sudo .venv/bin/python benchmarks/bench_straggler.py --seeds 0        # one seed, about 15 min

Every launch is real: ``hosts.netns_cluster`` builds 4 network namespaces (unshaped links: the straggler is the
point, not the network), each host runs one rank of ``train.py`` with the stock deepspeed launcher, and every host's
processes are held to a CPU share by a CFS quota (``--cpus``): ``--fast-cpus`` cores each (default 0.5: the four
hosts together use this 2-core machine's two cores, so a host never runs faster because another one is slowed), and
the slow host (host 3) a third of that. Digits, label-sorted, ResNet-8, the recipe's batch (each worker draws
``base_batch`` from every chunk it holds), tau=40, ``--steps`` steps, evaluated at the end only.

Configurations, each launched twice per seed (every host at full share, then host 3 at a third), as one plan:

- RI-SGD mu=0.5 +deadline: ``deadline_margin=0.1`` (a round closes at 1.1 x the median of the recent rounds'
  times without the workers still stepping, when the others hold all the data: with mu=0.5 any 3 of the 4 do);
- RI-SGD mu=0.5: no deadline (every round waits for the slow node);
- PR-SGD (mu=0) +deadline: the same key, but no worker's data is held elsewhere, so the deadline never leaves the
  slow node out (the record says why: coverage);
- SyncSGD: a gradient all-reduce every step.

Throughput is steps per second up to the last step before the final evaluation (the record's ``wall_seconds`` on
its last line), so the evaluation's own time (slower on the slow host) is not counted. Reported per configuration:
the slowed run's throughput as a share of its unslowed run's (median over seeds, with the spread), the final test
accuracy of both, and the rounds that left the slow node out. Goal (issue 43): RI-SGD +deadline keeps >= 90% of
its unslowed throughput, its accuracy within the seed spread. Writes OUT/straggler.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import yaml
from sweep_data import digits_shards, label_sorted_manifest

from risgd_hosts import netns_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS, SLOW_HOST, TAU = 4, 3, 40
CONFIGS = {
    "RI-SGD mu=0.5 +deadline": ["algorithm=risgd", "mu=0.5", f"tau={TAU}", "deadline_margin=0.1"],
    "RI-SGD mu=0.5": ["algorithm=risgd", "mu=0.5", f"tau={TAU}"],
    "PR-SGD +deadline": ["algorithm=risgd", "mu=0", f"tau={TAU}", "deadline_margin=0.1"],
    "SyncSGD": ["algorithm=sync", "mu=0"],
}
GOAL = "RI-SGD mu=0.5 +deadline"


def slug(label: str) -> str:
    return label.replace(" ", "-").replace("=", "").replace("+", "").replace(".", "")


def launch(out: str, seed: int, slow: bool, steps: int, shards: str, manifest: str, fast_cpus: float,
           configs: dict | None = None) -> dict:
    """One launch: every configuration as a plan, every host at ``fast_cpus`` cores (host 3 at a third of it
    when ``slow``). Returns label -> run directory (a launch whose runs all finished is not run again)."""
    kind = "slow" if slow else "even"
    runs_dir = os.path.join(out, "runs")
    plan, dirs = [], {}
    for label, overrides in (configs or CONFIGS).items():
        name = f"{slug(label)}-s{seed}-{kind}"
        dirs[label] = os.path.join(runs_dir, name)
        run = [*overrides, f"run_name={name}", f"steps={steps}", f"seed={seed}"]
        if "mu=0.5" in overrides:  # mu=0 builds its own label-sorted chunks from the recipe's keys
            run.append(f"data.manifest={os.path.abspath(manifest)}")
        plan.append(run)
    if all(os.path.exists(os.path.join(d, "summary.json")) for d in dirs.values()):
        return dirs
    plan_path = os.path.join(out, "plans", f"s{seed}-{kind}-{len(plan)}.yaml")
    os.makedirs(os.path.dirname(plan_path), exist_ok=True)
    with open(plan_path, "w") as f:
        yaml.safe_dump(plan, f)
    command = [os.path.join(ROOT, "train.py"), "--recipe", os.path.join(ROOT, "recipes", "digits.yaml"),
               "--plan", os.path.abspath(plan_path), f"data.shards={os.path.abspath(shards)}",
               f"runs_dir={os.path.abspath(runs_dir)}", "wandb.enabled=false", "eval_every=0"]
    cpus = [fast_cpus] * HOSTS
    if slow:
        cpus[SLOW_HOST] = fast_cpus / 3
    t0 = time.perf_counter()
    print(f"[straggler] seed {seed}, {'host 3 at a third' if slow else 'every host even'} "
          f"(cores {','.join(f'{c:.3g}' for c in cpus)}) ...", end=" ", flush=True)
    netns_cluster.run(command, HOSTS, 1, None, os.path.join(out, "hosts", f"s{seed}-{kind}"), timeout_s=3600,
                      cpus=cpus)
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)
    return dirs


def load(run_dir: str) -> dict:
    """The run's summary, its last record line before the final evaluation, and its deadline events."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    steps = [m for m in lines if "event" not in m]
    last = steps[-1]
    return {"steps": last["step"], "wall": last["wall_seconds"], "steps_per_s": last["step"] / last["wall_seconds"],
            "acc": summary.get("final_test_acc"), "late_rounds": summary.get("late_rounds", 0),
            "late_waited": summary.get("late_waited", 0), "late_by_worker": summary.get("late_by_worker"),
            "rounds": summary.get("round"), "sha": summary.get("model_sha256"),
            "waited_because": sorted({e.get("waited_because") for e in lines if e.get("event") == "late"
                                      and not e.get("left_out")} - {None})}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def analyse(runs: dict, seeds: list[int]) -> dict:
    out = {}
    for label in CONFIGS:
        ran = [s for s in seeds if (label, s, False) in runs and (label, s, True) in runs]
        if not ran:
            continue
        even = [runs[(label, s, False)] for s in ran]
        slow = [runs[(label, s, True)] for s in ran]
        kept = [b["steps_per_s"] / a["steps_per_s"] for a, b in zip(even, slow)]
        out[label] = {"kept": _spread(kept), "even_steps_per_s": _spread([r["steps_per_s"] for r in even]),
                      "slow_steps_per_s": _spread([r["steps_per_s"] for r in slow]),
                      "even_acc": _spread([r["acc"] for r in even]), "slow_acc": _spread([r["acc"] for r in slow]),
                      "late_rounds": [r["late_rounds"] for r in slow], "rounds": [r["rounds"] for r in slow],
                      "late_waited": [r["late_waited"] for r in slow],
                      "waited_because": sorted({w for r in slow for w in r["waited_because"]})}
    return out


def _range(s: dict, fmt: str = ".2f") -> str:
    if s["n"] == 1:
        return format(s["median"], fmt)
    return f"{format(s['median'], fmt)} ({format(s['min'], fmt)}-{format(s['max'], fmt)})"


def format_table(result: dict, seeds: list[int]) -> str:
    rows = [f"4 hosts x 1 rank, host {SLOW_HOST} at a third of the others' CPU share; seeds {seeds}; median "
            "(min-max) over seeds",
            "| configuration | steps/s even | steps/s host 3 slow | kept | test acc even | test acc slow | "
            "rounds without host 3 |",
            "|---|---|---|---|---|---|---|"]
    for label, r in result.items():
        late = "-" if label == "SyncSGD" else (f"{statistics.median(r['late_rounds']):g} of "
                                               f"{statistics.median(r['rounds']):g}")
        if r["waited_because"]:
            late += f" (waited {statistics.median(r['late_waited']):g}: coverage)"
        rows.append(f"| {label} | {_range(r['even_steps_per_s'])} | {_range(r['slow_steps_per_s'])} | "
                    f"{_range(r['kept'], '.0%')} | {_range(r['even_acc'])} | {_range(r['slow_acc'])} | {late} |")
    return "\n".join(rows)


def check_goals(result: dict) -> list[str]:
    r = result[GOAL]
    kept = r["kept"]["median"]
    lines = [f"goal: {GOAL} keeps >= 90% of its unslowed throughput: {'met' if kept >= 0.9 else 'NOT met'} "
             f"({kept:.0%}; spread {r['kept']['min']:.0%}-{r['kept']['max']:.0%})"]
    even, slow = r["even_acc"], r["slow_acc"]
    if even["n"] < 2:
        lines.append(f"goal: its accuracy within the seed spread: not decided with one seed (slow {slow['median']:.2f}%"
                     f" against even {even['median']:.2f}%)")
    else:
        inside = even["min"] - 1e-9 <= slow["median"] <= even["max"] + 1e-9
        lines.append(f"goal: its accuracy within the seed spread: {'met' if inside else 'NOT met'} (slow median "
                     f"{slow['median']:.2f}% against even {even['min']:.2f}-{even['max']:.2f}%)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_straggler", help="output directory (default runs/bench_straggler)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=800, help="steps per run (default 800: 20 rounds of tau=40)")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                        help=f"run only these configurations (the others' runs already made are read), one of: "
                             f"{', '.join(CONFIGS)}")
    parser.add_argument("--fast-cpus", type=float, default=0.5,
                        help="cores each host may use (default 0.5); the slow host gets a third of it")
    args = parser.parse_args(argv)
    if args.steps < 3 * TAU or args.fast_cpus <= 0:
        print(f"error: --steps must be >= {3 * TAU} (a few rounds of tau={TAU}) and --fast-cpus > 0", file=sys.stderr)
        return 2
    unknown = [label for label in args.only or [] if label not in CONFIGS]
    if unknown:
        print(f"error: --only {unknown[0]!r} is not a configuration: use one of {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("error: the namespace hosts need root: run with sudo", file=sys.stderr)
        return 2
    out = args.out
    os.makedirs(out, exist_ok=True)
    shards, index = digits_shards(out)
    manifest = label_sorted_manifest(index, os.path.join(out, "manifest-4workers-mu0.5.yaml"), HOSTS, 0.5)
    runs = {}
    started = time.perf_counter()
    for seed in args.seeds:
        for slow in (False, True):
            todo = {label: CONFIGS[label] for label in args.only} if args.only else None
            for label, d in launch(out, seed, slow, args.steps, shards, manifest, args.fast_cpus, todo).items():
                runs[(label, seed, slow)] = load(d)
    for label in CONFIGS:  # runs of other configurations made before (e.g. seed 0's full table)
        for seed in range(100):
            for slow in (False, True):
                d = os.path.join(out, "runs", f"{slug(label)}-s{seed}-{'slow' if slow else 'even'}")
                if (label, seed, slow) not in runs and os.path.exists(os.path.join(d, "summary.json")):
                    runs[(label, seed, slow)] = load(d)
    seeds = sorted({s for (_, s, _) in runs})
    print(f"[straggler] all launches in {time.perf_counter() - started:.0f} s\n")
    result = analyse(runs, seeds)
    print(format_table(result, seeds))
    print()
    print("\n".join(check_goals(result)))
    with open(os.path.join(out, "straggler.json"), "w") as f:
        json.dump({"seeds": seeds, "steps": args.steps, "fast_cpus": args.fast_cpus, "result": result}, f,
                  indent=1)
    print(f"\nwrote {os.path.join(out, 'straggler.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
