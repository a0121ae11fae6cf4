"""Cluster-shaped RI-SGD on 2 test hosts x 2 ranks: flat vs node-level hierarchy, each with and
without overlapped averaging, on shaped links; next to the cost model.

    sudo .venv/bin/python benchmarks/bench_bandwidth.py --nodes          # about 27 min on 2 cores
    sudo .venv/bin/python benchmarks/bench_bandwidth.py --nodes --seeds 0 --bandwidths-mbit 10

Every launch is real: ``hosts.netns_cluster`` builds 2 network namespaces joined by veth links
shaped with tbf (the inter-host link); each host runs 2 ranks of ``train.py`` with the stock
deepspeed launcher, so intra-host traffic stays on the host's loopback and only what crosses hosts
meets the shaped link. Digits, label-sorted, ResNet-8, batch policy ``split`` (every rank draws 32
samples per step in every configuration, so compute per step is the same), 240 steps:

- SyncSGD: a gradient all-reduce over the 4 ranks every step;
- flat tau=60: 4 workers (one per rank), mu=0.25, a ring over the 4 ranks every 60 steps: each
  host sends 2(N-1)/N = 1.5 models over the link per round, 6 models in the run;
- node tau=60: node_size=2, 2 workers (one per host), mu=0.25 (a node then holds 3/4 of the data,
  as the flat run's two ranks on a host do), gradients all-reduced inside the host every step,
  slices across hosts every 60 steps: 1 model per host per round, 4 in the run;
- node tau=40: the same at equal inter-node bytes to flat tau=60 (6 rounds x 1 model = 6);
- and flat tau=60, node tau=60 with ``overlap`` (the round's all-reduce behind the next 60 steps).

Two kinds of launches, each one ``train.py --plan`` (one process group for all its runs: a launch
costs ~30 s of start-up here):
- trajectory runs at the fastest bandwidth, every configuration x seed, evaluated every 20 steps:
  the accuracy along the run. The trajectory does not depend on the link or on evaluation (the
  overlapped average is applied at a scheduled step), which the sweep checks by model sha256;
- timed runs at every bandwidth, every configuration x seed, evaluated only at the end: the
  wall-clock. SyncSGD runs --sync-timed-steps steps at bandwidths below --full-sync-mbit (its
  step time is constant).

Time to accuracy = the timed run's clock at the step where the trajectory run of the same seed
first reaches that seed's SyncSGD final accuracy: steps x compute per step + the rounds' exposed
communication up to there (with overlap: the scheduled waits, plus the wait for the round being
evaluated). The cost model (risgd_planner) is calibrated once per configuration at the
fastest bandwidth (median of the seeds' compute per step) and predicts every timed run's
wall-clock at the other bandwidths. Writes OUT/nodes_sweep.json and OUT/nodes_sweep.png.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import yaml
from sweep_data import digits_shards, label_sorted_manifest, mbytes_s

from risgd_common.layout import Layout
from risgd_hosts import netns_cluster
from risgd_planner import predict_hierarchical_run_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS, PER_HOST = 2, 2
STEPS = 240
# label -> (overrides, node_size, tau, overlap: False, True (applied tau steps later) or the delay in steps)
CONFIGS = {
    "SyncSGD": (["algorithm=sync", "mu=0"], 1, 1, False),
    "flat tau=60": (["algorithm=risgd", "mu=0.25", "tau=60"], 1, 60, False),
    "flat tau=60 +overlap": (["algorithm=risgd", "mu=0.25", "tau=60", "overlap=true"], 1, 60, True),
    "flat tau=60 +overlap d=20": (["algorithm=risgd", "mu=0.25", "tau=60", "overlap=true", "overlap_delay=20"], 1, 60,
                                  20),
    "node tau=60": (["algorithm=risgd", "mu=0.25", "tau=60", "node_size=2"], 2, 60, False),
    "node tau=60 +overlap": (["algorithm=risgd", "mu=0.25", "tau=60", "node_size=2", "overlap=true"], 2, 60, True),
    "node tau=40": (["algorithm=risgd", "mu=0.25", "tau=40", "node_size=2"], 2, 40, False),
}
SYNC = "SyncSGD"
PAIRS = [("flat tau=60", "flat tau=60 +overlap"), ("flat tau=60", "flat tau=60 +overlap d=20"),
         ("node tau=60", "node tau=60 +overlap")]


def slug(label: str) -> str:
    return label.replace(" ", "-").replace("=", "").replace("+", "")


def prepare_data(out: str) -> tuple[str, dict[int, str]]:
    """Digits shards and the label-sorted mu=0.25 manifests: per rank (4 workers) and per node (2)."""
    shards, index = digits_shards(out)
    return shards, {w: label_sorted_manifest(index, os.path.join(out, f"manifest-{w}workers-mu0.25.yaml"), w, 0.25)
                    for w in (HOSTS * PER_HOST, HOSTS)}


def run_name(label: str, seed: int, mbit: float, kind: str) -> str:
    return f"{slug(label)}-s{seed}-{mbit:g}mbit-{kind}"


def launch(out: str, mbit: float, seed: int, kind: str, sync_steps: int, shards: str, manifests: dict,
           configs: dict | None = None) -> dict:
    """One launch: every configuration (of ``configs``, default CONFIGS) for (bandwidth, seed, kind)
    as a plan; returns run dirs."""
    runs_dir = os.path.join(out, "runs")
    plan, dirs = [], {}
    for label, (overrides, node_size, _, _) in (configs or CONFIGS).items():
        name = run_name(label, seed, mbit, kind)
        dirs[label] = os.path.join(runs_dir, name)
        steps = sync_steps if label == SYNC else STEPS
        run = [*overrides, f"run_name={name}", f"steps={steps}", f"seed={seed}"]
        if label != SYNC and "mu=0" not in overrides:  # mu=0 (PR-SGD) builds its own, from the recipe's keys
            run.append(f"data.manifest={manifests[Layout(HOSTS * PER_HOST, node_size).workers]}")
        plan.append(run)
    if all(os.path.exists(os.path.join(d, "summary.json")) for d in dirs.values()):
        return dirs
    plan_path = os.path.join(out, "plans", f"s{seed}-{mbit:g}mbit-{kind}.yaml")
    os.makedirs(os.path.dirname(plan_path), exist_ok=True)
    with open(plan_path, "w") as f:
        yaml.safe_dump(plan, f)
    command = [os.path.join(ROOT, "train.py"), "--recipe", os.path.join(ROOT, "recipes", "digits.yaml"),
               "--plan", os.path.abspath(plan_path), "data.batch_policy=split",
               f"data.shards={os.path.abspath(shards)}", f"runs_dir={os.path.abspath(runs_dir)}", "wandb.enabled=false",
               f"network.bandwidth_gbit={mbit / 1000}", f"eval_every={20 if kind == 'traj' else 0}"]
    t0 = time.perf_counter()
    print(f"[nodes] seed {seed}, {mbit:g} Mbit/s, {kind} ...", end=" ", flush=True)
    netns_cluster.run(command, HOSTS, PER_HOST, mbit, os.path.join(out, "hosts", f"s{seed}-{mbit:g}mbit-{kind}"),
                      timeout_s=3600)
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)
    return dirs


def load(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        summary["metrics"] = [json.loads(line) for line in f]
    return summary


# -- the clock and the model ----------------------------------------------------------------------

def clock(run: dict, label: str, configs: dict | None = None) -> dict:
    """The timed run's clock, before the final evaluation: compute per step, and communication per
    round (exposed: blocking rounds; scheduled waits and the wait to see the last average with overlap)."""
    last = run["metrics"][-1]  # logged after the wait for the last average, before evaluating it
    _, _, tau, overlap = (configs or CONFIGS)[label]
    steps, rounds = last["step"], last["comm_rounds"]
    wall = last["wall_seconds"]
    if overlap:
        exposed = last["comm_wait_seconds"] + last["view_wait_seconds"]
        per_round = last["comm_wait_seconds"] / max(rounds - 1, 1)  # the scheduled waits
        final = last["view_wait_seconds"]  # the last round, waited for to evaluate it
    else:
        exposed = last["comm_seconds"]
        per_round = final = exposed / rounds if rounds else 0.0
    return {"wall": wall, "steps": steps, "rounds": rounds, "exposed": exposed, "per_round": per_round,
            "final_wait": final, "compute_per_step": (wall - exposed) / steps, "comm": last["comm_seconds"],
            "bytes_per_round": last["comm_bytes"] / rounds if rounds else 0.0}


def time_at(clk: dict, label: str, step: int, configs: dict | None = None) -> float:
    """Seconds to reach optimizer step ``step`` (an average) and hold its average."""
    _, _, tau, overlap = (configs or CONFIGS)[label]
    rounds = step // tau
    if overlap:
        return step * clk["compute_per_step"] + (rounds - 1) * clk["per_round"] + clk["final_wait"]
    return step * clk["compute_per_step"] + rounds * clk["per_round"]


def predicted_wall(label: str, clk: dict, compute_per_step: float, mbit: float) -> float:
    _, node_size, tau, overlap = CONFIGS[label]
    nodes = Layout(HOSTS * PER_HOST, node_size).workers
    return predict_hierarchical_run_seconds(compute_per_step, clk["steps"], clk["bytes_per_round"], clk["rounds"],
                                            nodes, node_size, mbytes_s(mbit), 0.0, overlap=bool(overlap),
                                            delay_steps=_delay(overlap, tau) if overlap else None)


def _delay(overlap: bool | int, tau: int) -> int:
    return tau if overlap is True else int(overlap)


def calibrate(clocks: dict, mbit: float) -> dict[str, float]:
    """Per configuration: compute per step = (wall - the model's communication) / steps at this
    bandwidth, the median over seeds."""
    out = {}
    for label in CONFIGS:
        values = []
        for (lab, _, m), clk in clocks.items():
            if lab != label or m != mbit:
                continue
            comm = predicted_wall(label, clk, 0.0, mbit)  # the model's communication alone
            values.append((clk["wall"] - comm) / clk["steps"])
        out[label] = statistics.median(values)
    return out


def reached(traj: dict, target: float) -> int | None:
    row = next((m for m in traj["metrics"] if m["test_acc"] >= target - 1e-9), None)
    return row["step"] if row else None


def _stats(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"median": math.inf, "min": math.inf, "max": math.inf, "n": len(values)}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def analyse(traj: dict, timed: dict, seeds: list[int], bandwidths: list[float]) -> dict:
    calib_mbit = max(bandwidths)
    clocks = {key: clock(run, key[0]) for key, run in timed.items()}
    c = calibrate(clocks, calib_mbit)
    def tta_of(label: str, seed: int, mbit: float) -> float:
        at = reached(traj[(label, seed)], traj[(SYNC, seed)]["final_test_acc"])
        return time_at(clocks[(label, seed, mbit)], label, at) if at else math.inf

    rows = []
    for mbit in sorted(bandwidths, reverse=True):
        for label in CONFIGS:
            tta, walls, preds, errs, accs = [], [], [], [], []
            for seed in seeds:
                clk = clocks[(label, seed, mbit)]
                tta.append(tta_of(label, seed, mbit))
                walls.append(clk["wall"] * (STEPS / clk["steps"]) if label == SYNC else clk["wall"])
                pred = predicted_wall(label, clk, c[label], mbit)
                preds.append(pred)
                errs.append(pred / clk["wall"] - 1)
                accs.append(traj[(label, seed)]["final_test_acc"])
            # SyncSGD's own time to its final accuracy (the first evaluation that reached it)
            sync_tta = [tta_of(SYNC, s, mbit) for s in seeds]
            first = clocks[(label, seeds[0], mbit)]
            rows.append({"config": label, "mbit": mbit, "calibration": mbit == calib_mbit,
                         "wall_s": _stats(walls), "pred_err": errs, "tta_s": _stats(tta),
                         "tta_ratio": _stats([t / s for t, s in zip(tta, sync_tta)]),
                         "acc_mean": statistics.mean(accs), "acc_sd": statistics.pstdev(accs),
                         "reached_step": [reached(traj[(label, s)], traj[(SYNC, s)]["final_test_acc"]) for s in seeds],
                         "rounds": first["rounds"], "comm_s": _stats([clocks[(label, s, mbit)]["comm"] for s in seeds]),
                         "exposed_s": _stats([clocks[(label, s, mbit)]["exposed"] for s in seeds]),
                         "inter_mb_per_host": _inter_bytes(label, first) / 1e6})
    hidden = []
    for plain, over in PAIRS:
        for mbit in sorted(bandwidths, reverse=True):
            whole, steady, engine = [], [], []
            for seed in seeds:
                a, b = clocks[(plain, seed, mbit)], clocks[(over, seed, mbit)]
                saved = a["wall"] - b["wall"]
                whole.append(saved / a["comm"])
                steady.append(saved / (a["comm"] * (a["rounds"] - 1) / a["rounds"]))
                # the engine's own view: scheduled waits against the rounds' background time
                engine.append(1 - b["per_round"] / (b["comm"] / b["rounds"]) if b["comm"] > 0 else 1.0)
            acc = [traj[(over, s)]["final_test_acc"] - traj[(plain, s)]["final_test_acc"] for s in seeds]
            hidden.append({"pair": f"{plain} / {over}", "mbit": mbit, "hidden_whole": _stats(whole),
                           "hidden_steady": _stats(steady), "hidden_engine": _stats(engine),
                           "acc_cost_pt": acc})
    return {"calibration_mbit": calib_mbit, "compute_s_per_step": c, "rows": rows, "hidden": hidden,
            "seeds": seeds, "targets": {s: traj[(SYNC, s)]["final_test_acc"] for s in seeds}}


def _inter_bytes(label: str, clk: dict) -> float:
    """Bytes each host sends over the inter-host link in a full run (ring traffic)."""
    _, node_size, tau, _ = CONFIGS[label]
    n = Layout(HOSTS * PER_HOST, node_size).workers  # ranks (flat) or nodes in the ring across hosts
    per_round = clk["bytes_per_round"] * 2 * (n - 1) / n * (1 if node_size > 1 else PER_HOST / 2)
    rounds = STEPS if label == SYNC else STEPS // tau
    return per_round * rounds


def check_goals(result: dict) -> list[str]:
    lines = []
    for h in result["hidden"]:
        if h["mbit"] != 10:
            continue
        st, wh = h["hidden_steady"], h["hidden_whole"]
        lines.append(f"(a) {h['pair']} at 10 Mbit/s: overlap hides {100 * st['median']:.0f}% of the communication "
                     f"of the rounds it can hide (seeds {100 * st['min']:.0f}..{100 * st['max']:.0f}%; "
                     f"{100 * wh['median']:.0f}% of all, the last round included): "
                     f"{'met' if st['median'] >= 0.8 else 'NOT met'} (goal >= 80%)")
    for h in result["hidden"]:
        if h["mbit"] != result["calibration_mbit"]:
            continue
        cost = statistics.mean(h["acc_cost_pt"])
        lines.append(f"(b) {h['pair']}: final accuracy {cost:+.2f} pt on average over seeds "
                     f"({', '.join(f'{x:+.2f}' for x in h['acc_cost_pt'])}): "
                     f"{'met' if abs(cost) <= 0.5 else 'NOT met'} (goal within 0.5 pt)")
    by = {(r["config"], r["mbit"]): r for r in result["rows"]}
    for mbit in sorted({r["mbit"] for r in result["rows"]}, reverse=True):
        node, flat = by[("node tau=40", mbit)]["tta_s"]["median"], by[("flat tau=60", mbit)]["tta_s"]["median"]
        verdict = "" if mbit > 10 else (": met" if node < flat else ": NOT met") + " (goal: sooner at <= 10 Mbit/s)"
        lines.append(f"(c) {mbit:g} Mbit/s, equal inter-node bytes: node tau=40 {_fmt(node)} s vs flat tau=60 "
                     f"{_fmt(flat)} s to SyncSGD's accuracy{verdict}")
    errs = [(abs(e), r["config"], r["mbit"]) for r in result["rows"] if not r["calibration"] for e in r["pred_err"]]
    worst = max(errs)
    within = sum(e <= 0.2 for e, _, _ in errs)
    lines.append(f"(d) cost model vs {len(errs)} uncalibrated timed runs: {within} within 20%, worst "
                 f"{100 * worst[0]:.0f}% ({worst[1]}, {worst[2]:g} Mbit/s): "
                 f"{'met' if worst[0] <= 0.2 else 'NOT met'} (goal: each within 20%)")
    return lines


def _ratio(x: float) -> str:
    return "never" if not math.isfinite(x) else f"{x:.3f}"


def _fmt(x: float) -> str:
    return "never" if not math.isfinite(x) else f"{x:.1f}"


def format_table(result: dict) -> str:
    head = (f"{'Mbit/s':>6} {'configuration':<26} {'rounds':>6} {'MB/host':>7} {'wall s':>7} {'model err':>10} "
            f"{'comm s':>7} {'exposed s':>9} {'acc %':>11} {'t->acc s':>17} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    last = None
    for r in result["rows"]:
        if last is not None and r["mbit"] != last:
            lines.append("")
        last = r["mbit"]
        err = "calib" if r["calibration"] else f"{100 * max(r['pred_err'], key=abs):+.0f}%"
        t = r["tta_s"]
        spread = f"{_fmt(t['median'])} ({_fmt(t['min'])}-{_fmt(t['max'])})"
        lines.append(f"{r['mbit']:>6g} {r['config']:<26} {r['rounds']:>6} {r['inter_mb_per_host']:>7.2f} "
                     f"{r['wall_s']['median']:>7.1f} {err:>10} {r['comm_s']['median']:>7.1f} "
                     f"{r['exposed_s']['median']:>9.1f} {r['acc_mean']:>6.2f}±{r['acc_sd']:<4.2f} {spread:>17} "
                     f"{_ratio(r['tta_ratio']['median']):>6}")
    lines.append("medians over seeds (t->acc: median (min-max)); wall = a timed run (SyncSGD below the full bandwidth: "
                 "its steps scaled to the run); model err = the cost model's worst error over seeds; MB/host = "
                 "inter-host payload each host sends in the run (ring); acc = trajectory runs' final accuracy, "
                 "mean±sd; ratio = time to SyncSGD's final accuracy / SyncSGD's.")
    lines.append("")
    for h in result["hidden"]:
        lines.append(f"{h['mbit']:>6g} Mbit/s {h['pair']:<46} hidden: "
                     f"{100 * h['hidden_steady']['median']:>4.0f}% of the hideable rounds, "
                     f"{100 * h['hidden_whole']['median']:>4.0f}% of all (wall-clock); engine clocks: scheduled waits "
                     f"{100 * (1 - h['hidden_engine']['median']):>3.0f}% of the background round time; accuracy cost "
                     f"{statistics.mean(h['acc_cost_pt']):+.2f} pt")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = dict(zip(CONFIGS, ["k", "tab:blue", "tab:cyan", "tab:green", "tab:red", "tab:orange", "tab:purple"]))
    for label, color in colors.items():
        pts = sorted((r["mbit"], r["tta_s"]) for r in result["rows"] if r["config"] == label)
        xs = [m for m, t in pts if math.isfinite(t["median"])]
        ys = [t["median"] for _, t in pts if math.isfinite(t["median"])]
        lo = [t["median"] - t["min"] for _, t in pts if math.isfinite(t["median"])]
        hi = [t["max"] - t["median"] for _, t in pts if math.isfinite(t["median"])]
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker="o", capsize=3, label=label)
        else:  # the median seed never reaches SyncSGD's final accuracy
            ax.plot([], [], color=color, marker="x", ls="", label=f"{label}: median seed never reaches it")
    ax.set(xscale="log", yscale="log", xlabel="inter-host link (Mbit/s)", ylabel="seconds to SyncSGD's final accuracy",
           title="2 hosts x 2 ranks: time to accuracy (median, min-max over seeds)")
    ax.legend(fontsize=8)
    width = 0.25
    mbits = sorted({h["mbit"] for h in result["hidden"]})
    for i, (plain, over) in enumerate(PAIRS):
        vals = [next(h["hidden_steady"]["median"] for h in result["hidden"] if h["mbit"] == m and
                     h["pair"] == f"{plain} / {over}") for m in mbits]
        ax2.bar([j + (i - 1) * width for j in range(len(mbits))], [100 * v for v in vals], width,
                label=over, color=colors[over])
    ax2.axhline(80, color="k", ls="--", lw=0.8, label="goal 80%")
    ax2.set_xticks(range(len(mbits)), [f"{m:g}" for m in mbits])
    ax2.set(xlabel="inter-host link (Mbit/s)", ylabel="% of hideable communication hidden",
            title="Overlap: communication hidden behind local steps")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args) -> int:
    """Run (or re-read) every launch, then print the table and goals; ``args`` from bench_bandwidth."""
    out = os.path.join(args.out, "nodes") if not args.out.endswith("nodes") else args.out
    os.makedirs(out, exist_ok=True)
    shards, manifests = prepare_data(out)
    bandwidths = sorted(args.bandwidths_mbit, reverse=True)
    calib = bandwidths[0]
    started = time.perf_counter()
    traj, timed = {}, {}
    for seed in args.seeds:
        dirs = launch(out, calib, seed, "traj", STEPS, shards, manifests)
        for label, d in dirs.items():
            traj[(label, seed)] = load(d)
    for mbit in bandwidths:
        sync_steps = STEPS if mbit >= args.full_sync_mbit else args.sync_timed_steps
        for seed in args.seeds:
            dirs = launch(out, mbit, seed, "timed", sync_steps, shards, manifests)
            for label, d in dirs.items():
                timed[(label, seed, mbit)] = load(d)
    print(f"[nodes] all launches in {time.perf_counter() - started:.0f} s\n")
    result = analyse(traj, timed, list(args.seeds), bandwidths)
    print(format_table(result))
    # SyncSGD is left out: plain DeepSpeed never averages BatchNorm statistics, so every evaluation
    # does (consensus()), and the final running statistics depend on how often it evaluated
    same = all(timed[(label, s, m)]["model_sha256"] == traj[(label, s)]["model_sha256"]
               for (label, s, m) in timed if label != SYNC)
    print("\ntrajectory independent of the link and of evaluation (each local-SGD timed run ends with its trajectory "
          f"run's model sha256): {'yes' if same else 'NO'}")
    print(f"cost model calibrated at {calib:g} Mbit/s (compute s/step, median over seeds): "
          + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in result["compute_s_per_step"].items()))
    print("SyncSGD final accuracy (the targets): "
          + ", ".join(f"seed {s}: {t:.2f}%" for s, t in result["targets"].items()))
    print()
    print("\n".join(check_goals(result)))
    png = os.path.join(out, "nodes_sweep.png")
    plot(result, png)
    with open(os.path.join(out, "nodes_sweep.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {png} and {os.path.join(out, 'nodes_sweep.json')}")
    return 0
