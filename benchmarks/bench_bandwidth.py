"""Where RI-SGD wins: a link-bandwidth sweep on 4 test hosts x 1 rank, measured next to the cost model.

    sudo .venv/bin/python benchmarks/bench_bandwidth.py          # the sweep, about 25 min on 2 cores
    sudo .venv/bin/python benchmarks/bench_bandwidth.py --bandwidths-mbit 1000 10 --full-mbit 1000 10
    sudo .venv/bin/python benchmarks/bench_bandwidth.py --nodes  # 2 hosts x 2 ranks: node level, overlap

With ``--nodes`` the sweep is the cluster-shaped one of ``benchmarks/bench_nodes.py`` (its docstring
says what runs): flat vs node-level RI-SGD, each with and without overlapped averaging, on 2 hosts
x 2 ranks at 100, 10 and 1 Mbit/s, 3 seeds. Without it, the sweep below.

Every run is a real 4-host launch through ``hosts.netns_cluster`` (network namespaces, veth links
shaped with tbf, per-host data replicated by ``risgd_data.replicate``, the stock deepspeed launcher with
--no_ssh, gloo over the links) of ``train.py`` on the embedded digits recipe (label-sorted, ResNet-8,
base batch 32, tau=50): SyncSGD, PR-SGD and RI-SGD at mu=0.25 and 0.5 under both batch policies.

Two kinds of rows:
- ``full``: the whole run (--steps) at that bandwidth; time to accuracy is read off its own
  metrics.jsonl.
- ``timed``: a short run (--timed-steps, --timed-sync-steps) at that bandwidth measures the time per
  step and per collective; time to accuracy is those times applied to the steps and collectives at
  which the full run reached the target. The training trajectory does not depend on the link (the
  sweep checks that full runs of one algorithm at different bandwidths end with the same model
  sha256), so only the clock changes. Full runs at low bandwidth would take hours of SyncSGD.

At every bandwidth ``benchmarks/round_probe.py`` also times one averaging round in isolation (the
engine's own round (risgd_ext.round) after a barrier) and a one-float all_reduce, whose time / 2(N-1) is the
per-message latency L of the alpha-beta model.

The cost model (risgd_planner) is calibrated once, at the fastest full bandwidth: L from
the probe there, and each algorithm's seconds per step outside the transfer (its wall-clock less
the model's transfer time; it depends on the batch policy, and on ranks that share 2 cores it
includes waiting for each other). Everything else is predicted: the wall-clock of every other run
from its step count, collective count and bytes, and the time-to-accuracy ratios along the full
runs' trajectories. Prints one table row per algorithm and bandwidth and the goal checks; writes
``OUT/bandwidth_sweep.png`` (time-to-accuracy ratio against bandwidth, measured points over the
model's curves) and ``OUT/bandwidth_sweep.json``. Finished runs are kept: re-running re-prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from sweep_data import digits_shards, label_sorted_manifest, mbytes_s

from risgd_hosts import netns_cluster
from risgd_planner import predict_run_seconds, ring_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = 4
# label, algorithm, mu, batch policy
ALGORITHMS = [
    ("SyncSGD", "sync", 0.0, "per_chunk"),
    ("PR-SGD", "prsgd", 0.0, "per_chunk"),
    ("RI-SGD mu=0.25 per_chunk", "risgd", 0.25, "per_chunk"),
    ("RI-SGD mu=0.25 split", "risgd", 0.25, "split"),
    ("RI-SGD mu=0.5 per_chunk", "risgd", 0.5, "per_chunk"),
    ("RI-SGD mu=0.5 split", "risgd", 0.5, "split"),
]
SYNC = "SyncSGD"


def slug(label: str) -> str:
    return label.lower().replace(" ", "-").replace("=", "")


# -- running ---------------------------------------------------------------------------------------

def prepare_data(out: str) -> tuple[str, dict[float, str]]:
    """Digits shards and one redundancy manifest per mu (label-sorted, 4 workers)."""
    shards, index = digits_shards(out)
    return shards, {mu: label_sorted_manifest(index, os.path.join(out, f"manifest-mu{mu:g}.yaml"), HOSTS, mu)
                    for mu in sorted({mu for _, _, mu, _ in ALGORITHMS})}


def run_one(out: str, label: str, mbit: float, steps: int, tau: int, shards: str, manifests: dict) -> str:
    """One 4-host launch (kept if already finished); returns its run directory."""
    _, algorithm, mu, policy = next(a for a in ALGORITHMS if a[0] == label)
    name = f"{slug(label)}-{mbit:g}mbit-{steps}steps"
    run_dir = os.path.join(out, "runs", name)
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return run_dir
    eval_every = tau if algorithm != "sync" else min(tau, steps)
    command = [os.path.join(ROOT, "train.py"), "--recipe", os.path.join(ROOT, "recipes", "digits.yaml"),
               f"algorithm={algorithm}", f"mu={mu}", f"tau={tau}", f"steps={steps}", f"eval_every={eval_every}",
               f"data.batch_policy={policy}", "data.shards={data}", f"data.manifest={manifests[mu]}",
               f"runs_dir={os.path.join(out, 'runs')}", f"run_name={name}", "wandb.enabled=false",
               f"network.bandwidth_gbit={mbit / 1000}"]
    t0 = time.perf_counter()
    print(f"[sweep] {name} ...", end=" ", flush=True)
    netns_cluster.run(command, HOSTS, 1, mbit, os.path.join(out, "hosts", name), manifests[mu], shards,
                      timeout_s=3600)
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def probe(out: str, mbit: float) -> dict:
    """One averaging round and the per-message latency, timed in isolation at this bandwidth."""
    path = os.path.join(out, "probes", f"{mbit:g}mbit.json")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"[sweep] round probe at {mbit:g} Mbit/s ...", end=" ", flush=True)
        t0 = time.perf_counter()
        command = [os.path.join(ROOT, "benchmarks", "round_probe.py"), "--out", os.path.abspath(path)]
        netns_cluster.run(command, HOSTS, 1, mbit, os.path.join(out, "hosts", f"probe-{mbit:g}mbit"), timeout_s=1200)
        print(f"{time.perf_counter() - t0:.0f} s", flush=True)
    with open(path) as f:
        return json.load(f)


def load_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        summary["metrics"] = [json.loads(line) for line in f]
    with open(os.path.join(os.path.dirname(os.path.dirname(run_dir)), "hosts", os.path.basename(run_dir),
                           "traffic.json")) as f:
        summary["traffic"] = json.load(f)
    return summary


# -- analysis --------------------------------------------------------------------------------------

def collectives(run: dict, row: dict | None = None) -> int:
    """Collectives on the links up to a metrics row (default: the whole run). A synchronous run also
    averages BatchNorm statistics once per evaluation (plain DeepSpeed never syncs them)."""
    row = row or run["metrics"][-1]
    evals = sum(1 for m in run["metrics"] if m["step"] <= row["step"]) if run["algorithm"] == "sync" else 0
    return row["comm_rounds"] + evals


def noncomm_per_step(run: dict) -> float:
    return (run["wall_seconds"] - run["comm_seconds"]) / run["steps"]


def reached(run: dict, target: float) -> dict | None:
    """The first evaluation at or above the target accuracy."""
    return next((m for m in run["metrics"] if m["test_acc"] >= target - 1e-9), None)


def analyse(runs: dict, probes: dict, full_mbit: list[float]) -> dict:
    """Table rows, goal checks and the model's curves from the finished runs."""
    calib = max(full_mbit)
    latency = probes[calib]["latency_s"]

    def calibrated_step(run: dict) -> float:
        # Seconds per step that are not transfer: the calibration run's wall-clock less the model's
        # transfer time. On ranks that share cores this includes waiting for each other.
        transfer = ring_seconds(run["comm_bytes"], HOSTS, mbytes_s(calib), latency, collectives(run))
        return (run["wall_seconds"] - transfer) / run["steps"]

    full_ref = {label: runs[(label, calib, "full")] for label, *_ in ALGORITHMS}  # trajectories
    c = {label: calibrated_step(run) for label, run in full_ref.items()}
    target = full_ref[SYNC]["final_test_acc"]
    at = {label: reached(full_ref[label], target) for label in c}

    def predicted_tta(label: str, mbit: float) -> float:
        row = at[label]
        if row is None:
            return math.inf
        run = full_ref[label]
        return predict_run_seconds(c[label], row["step"], row["comm_bytes"], collectives(run, row), HOSTS,
                                   mbytes_s(mbit), latency)

    rows = []
    order = [label for label, *_ in ALGORITHMS]
    for (label, mbit, kind), run in sorted(runs.items(), key=lambda kv: (-kv[0][1], order.index(kv[0][0]))):
        n_coll = collectives(run)
        pred_wall = predict_run_seconds(c[label], run["steps"], run["comm_bytes"], n_coll, HOSTS, mbytes_s(mbit),
                                        latency)
        if at[label] is None:
            tta = math.inf
        elif kind == "full":
            tta = reached(run, target)["wall_seconds"]
        else:  # this bandwidth's measured step and collective times, along the full run's trajectory
            per_coll = run["comm_seconds"] / n_coll if n_coll else 0.0
            tta = at[label]["step"] * noncomm_per_step(run) + per_coll * collectives(full_ref[label], at[label])
        wire = sum(h["tx_bytes"] for h in run["traffic"]["per_host"])
        rows.append({
            "algorithm": label, "mbit": mbit, "kind": kind, "calibration": kind == "full" and mbit == calib,
            "steps": run["steps"], "wall_s": run["wall_seconds"], "pred_wall_s": pred_wall,
            "wall_err": pred_wall / run["wall_seconds"] - 1, "comm_s": run["comm_seconds"],
            "comm_share": run["comm_seconds"] / run["wall_seconds"], "rounds": run["comm_rounds"],
            "comm_mb": run["comm_bytes"] / 1e6, "wire_mb": wire / 1e6,
            "final_acc": full_ref[label]["final_test_acc"], "tta_s": tta, "pred_tta_s": predicted_tta(label, mbit),
            "model_sha256": run["model_sha256"]})
    for row in rows:
        sync = next(r for r in rows if r["algorithm"] == SYNC and r["mbit"] == row["mbit"])
        row["tta_ratio"] = row["tta_s"] / sync["tta_s"]
        row["pred_tta_ratio"] = row["pred_tta_s"] / sync["pred_tta_s"]
    for mbit, p in probes.items():
        p["ring_bound_s"] = ring_seconds(p["round_bytes"], HOSTS, mbytes_s(mbit), 0.0)
        p["model_s"] = ring_seconds(p["round_bytes"], HOSTS, mbytes_s(mbit), latency)
    return {"latency_s": latency, "noncomm_s_per_step": c, "probes": probes, "target_acc": target,
            "calibration_mbit": calib,
            "reached_at_step": {k: (v["step"] if v else None) for k, v in at.items()}, "rows": rows,
            "curve": curves(predicted_tta)}


def curves(predicted_tta) -> dict:
    grid = [10 ** (x / 20) for x in range(-10, 61)]  # 0.3 Mbit/s .. 1 Gbit/s
    out = {"mbit": grid}
    for label, *_ in ALGORITHMS[1:]:
        out[label] = [predicted_tta(label, b) / predicted_tta(SYNC, b) for b in grid]
    return out


def check_goals(result: dict) -> list[str]:
    rows = result["rows"]
    lines = []
    regime = sorted({r["mbit"] for r in rows if r["algorithm"] == SYNC and r["comm_share"] >= 0.8}, reverse=True)
    for mbit in regime:
        best = min((r for r in rows if r["mbit"] == mbit and r["algorithm"].startswith("RI-SGD")),
                   key=lambda r: r["tta_ratio"])
        speed = 1 / best["tta_ratio"]
        lines.append(f"(a) {mbit:g} Mbit/s (SyncSGD {100 * next(r['comm_share'] for r in rows if r['algorithm'] == SYNC and r['mbit'] == mbit):.0f}% "  # noqa: E501
                     f"communicating, {best['kind']}): {best['algorithm']} reaches {result['target_acc']:.2f}% "
                     f"{speed:.1f}x sooner than SyncSGD: {'met' if speed >= 3 else 'NOT met'} (goal >= 3x)")
    if not regime:
        lines.append("(a) no bandwidth in the sweep had SyncSGD >= 80% communicating: extend it downwards")
    predicted = [r for r in rows if not r["calibration"]]
    worst = max(predicted, key=lambda r: abs(r["wall_err"]))
    errors = sorted(abs(r["wall_err"]) for r in predicted)
    lines.append(f"(b) cost model vs measured wall-clock over {len(predicted)} uncalibrated runs: worst "
                 f"{100 * worst['wall_err']:+.1f}% ({worst['algorithm']}, {worst['mbit']:g} Mbit/s), median |error| "
                 f"{100 * errors[len(errors) // 2]:.1f}%, {sum(e <= 0.2 for e in errors)} of {len(errors)} within 20%: "
                 f"{'met' if abs(worst['wall_err']) <= 0.2 else 'NOT met'} (goal: each within 20%)")
    for mbit, p in sorted(result["probes"].items(), reverse=True):
        ratio = p["round_seconds_median"] / p["ring_bound_s"]
        lines.append(f"(c) {mbit:g} Mbit/s: averaging round {1e3 * p['round_seconds_median']:.1f} ms (median of "
                     f"{len(p['round_seconds'])}) / ring bound {1e3 * p['ring_bound_s']:.1f} ms = {ratio:.2f}: "
                     f"{'met' if ratio <= 1.3 else 'NOT met'} (goal <= 1.3); plain all_reduce of the same "
                     f"bytes {1e3 * p['allreduce_seconds_median']:.1f} ms; model with 2(N-1) latencies "
                     f"{1e3 * p['model_s']:.1f} ms")
    return lines


def format_table(result: dict) -> str:
    head = (f"{'Mbit/s':>7} {'algorithm':<25} {'rows':<6} {'steps':>5} {'wall s':>7} {'model s':>7} {'err':>6} "
            f"{'comm s':>7} {'comm%':>6} {'rounds':>6} {'MB':>7} {'acc':>6} {'t->acc s':>8} {'ratio':>6} "
            f"{'model':>6}")
    lines = [head, "-" * len(head)]
    last = None
    for r in result["rows"]:
        if last is not None and r["mbit"] != last:
            lines.append("")
        last = r["mbit"]
        kind = r["kind"] + ("*" if r["calibration"] else "")
        lines.append(f"{r['mbit']:>7g} {r['algorithm']:<25} {kind:<6} {r['steps']:>5} {r['wall_s']:>7.1f} "
                     f"{r['pred_wall_s']:>7.1f} {100 * r['wall_err']:>+5.0f}% {r['comm_s']:>7.1f} "
                     f"{100 * r['comm_share']:>5.0f}% {r['rounds']:>6} {r['comm_mb']:>7.1f} {r['final_acc']:>6.2f} "
                     f"{_num(r['tta_s'], 8, 1)} {_num(r['tta_ratio'], 6, 2)} {_num(r['pred_tta_ratio'], 6, 2)}")
    lines.append("rows: full = the whole run at this bandwidth; timed = a short run here, time to accuracy along the "
                 "full run's trajectory; * = the calibration runs.")
    lines.append(f"ratio = time to reach SyncSGD's final accuracy ({result['target_acc']:.2f}%) / SyncSGD's; "
                 "model = the cost model's ratio; acc = the full run's final test accuracy.")
    return "\n".join(lines)


def _num(x: float, width: int, digits: int) -> str:
    return f"{'never':>{width}}" if not math.isfinite(x) else f"{x:>{width}.{digits}f}"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = dict(zip([a[0] for a in ALGORITHMS[1:]], ["tab:gray", "tab:blue", "tab:cyan", "tab:red", "tab:orange"]))
    curve = result["curve"]
    for label, color in colors.items():
        ys = [y if math.isfinite(y) else float("nan") for y in curve[label]]
        never = not any(math.isfinite(y) for y in curve[label])
        ax.plot(curve["mbit"], ys, color=color,
                label=f"{label}: never reaches it" if never else f"{label} (model)")
        for kind, marker in (("full", "o"), ("timed", "s")):
            pts = [(r["mbit"], r["tta_ratio"]) for r in result["rows"]
                   if r["algorithm"] == label and r["kind"] == kind and math.isfinite(r["tta_ratio"])]
            if pts:
                ax.scatter(*zip(*pts), color=color, marker=marker, zorder=3,
                           facecolors=color if kind == "full" else "none")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1 / 3, color="k", ls="--", lw=0.8, label="3x sooner than SyncSGD")
    ax.set(xscale="log", yscale="log", xlabel="link bandwidth (Mbit/s)",
           ylabel=f"time to {result['target_acc']:.1f}% / SyncSGD's",
           title="Time to SyncSGD's final accuracy (dots: full runs, squares: timed)")
    ax.legend(fontsize=7)
    sync = [r for r in result["rows"] if r["algorithm"] == SYNC]
    ax2.scatter([r["mbit"] for r in sync], [r["comm_share"] for r in sync], color="k", label="SyncSGD measured")
    for label, color in (("RI-SGD mu=0.5 split", "tab:orange"), ("RI-SGD mu=0.5 per_chunk", "tab:red")):
        pts = [(r["mbit"], r["comm_share"]) for r in result["rows"] if r["algorithm"] == label]
        ax2.scatter(*zip(*pts), color=color, label=f"{label} measured")
    ax2.axhline(0.8, color="k", ls="--", lw=0.8)
    ax2.set(xscale="log", ylim=(0, 1), xlabel="link bandwidth (Mbit/s)", ylabel="share of wall-clock communicating",
            title="Communication share")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidths-mbit", type=float, nargs="+", default=[1000, 100, 10, 3, 1],
                        help="link bandwidths to sweep (default 1000 100 10 3 1)")
    parser.add_argument("--full-mbit", type=float, nargs="+", default=[1000, 100, 10],
                        help="bandwidths with full runs; the fastest calibrates the model (default 1000 100 10)")
    parser.add_argument("--steps", type=int, default=300, help="steps of a full run (default 300)")
    parser.add_argument("--tau", type=int, default=50, help="local steps per round (default 50)")
    parser.add_argument("--timed-steps", type=int, default=100, help="steps of a timed local-SGD run (default 100)")
    parser.add_argument("--timed-sync-steps", type=int, default=20, help="steps of a timed SyncSGD run (default 20)")
    parser.add_argument("--out", default="runs/bench_bandwidth", help="output directory (default runs/bench_bandwidth)")
    nodes = parser.add_argument_group("--nodes: 2 hosts x 2 ranks, the node level and overlap (bench_nodes.py)")
    nodes.add_argument("--nodes", action="store_true", help="run the cluster-shaped sweep instead (writes OUT/nodes/)")
    nodes.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    nodes.add_argument("--sync-timed-steps", type=int, default=20,
                       help="SyncSGD's timed steps below --full-sync-mbit (default 20)")
    nodes.add_argument("--full-sync-mbit", type=float, default=10,
                       help="bandwidths from this one up time SyncSGD's whole run (default 10)")
    args = parser.parse_args(argv)
    if args.nodes:
        if args.bandwidths_mbit == parser.get_default("bandwidths_mbit"):
            args.bandwidths_mbit = [100, 10, 1]
        why = netns_cluster.netns_available()
        if why:
            print(f"error: the sweep needs network namespaces: {why}", file=sys.stderr)
            return 1
        import bench_nodes

        return bench_nodes.main(args)
    if not set(args.full_mbit) <= set(args.bandwidths_mbit) or len(args.full_mbit) < 1:
        parser.error("--full-mbit must be a non-empty subset of --bandwidths-mbit")
    why = netns_cluster.netns_available()
    if why:
        print(f"error: the sweep needs network namespaces: {why}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    shards, manifests = prepare_data(args.out)
    started = time.perf_counter()
    runs, probes = {}, {}
    for mbit in sorted(args.bandwidths_mbit, reverse=True):  # the calibration bandwidth first
        probes[mbit] = probe(args.out, mbit)
        full = mbit in args.full_mbit
        for label, *_ in ALGORITHMS:
            steps = args.steps if full else (args.timed_sync_steps if label == SYNC else args.timed_steps)
            run_dir = run_one(args.out, label, mbit, steps, args.tau, shards, manifests)
            runs[(label, mbit, "full" if full else "timed")] = load_run(run_dir)
    print(f"[sweep] all runs in {time.perf_counter() - started:.0f} s\n")

    result = analyse(runs, probes, args.full_mbit)
    print(format_table(result))
    print(f"\ncost model calibrated at {result['calibration_mbit']:g} Mbit/s: latency L = "
          f"{1e6 * result['latency_s']:.0f} us per message (one-float all_reduce / 2(N-1)); other s/step: "
          + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in result["noncomm_s_per_step"].items()))
    print("steps to reach the target in the full runs: "
          + ", ".join(f"{k} {v}" for k, v in result["reached_at_step"].items()))
    same = {label: {r["model_sha256"] for r in result["rows"] if r["algorithm"] == label and r["kind"] == "full"}
            for label, *_ in ALGORITHMS}
    print("trajectory independent of bandwidth (same final model sha256 in every full run): "
          + ("yes" if all(len(s) == 1 for s in same.values()) else f"NO: {same}"))
    ring_factor = HOSTS * 2 * (HOSTS - 1) / HOSTS  # every host sends 2(N-1)/N of the payload
    wire = [r["wire_mb"] / (ring_factor * r["comm_mb"]) for r in result["rows"] if r["kind"] == "full"]
    print(f"bytes sent on the links / ring traffic N x 2(N-1)/N x payload: {min(wire):.3f}..{max(wire):.3f} "
          "(framing and the launcher's own traffic)")
    print()
    print("\n".join(check_goals(result)))
    png = os.path.join(args.out, "bandwidth_sweep.png")
    plot(result, png)
    with open(os.path.join(args.out, "bandwidth_sweep.json"), "w") as f:
        json.dump({k: v for k, v in result.items()}, f, indent=1, default=str)
    print(f"\nwrote {png} and {os.path.join(args.out, 'bandwidth_sweep.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
