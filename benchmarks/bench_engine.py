"""Engine overhead benchmark: ratios measured side by side in one run on N CPU ranks (gloo).

(a) local-step throughput of a risgd_ext engine / the same loop in plain PyTorch (no DeepSpeed,
    no torch.distributed): goal >= 0.97.
(b) one averaging round / one raw ``dist.all_reduce`` of a single flat buffer of the same bytes on
    the same process group: goal <= 1.15; and the same without the divergence measurement.
(c) a synchronous DeepSpeed step (gradient all-reduce) / a local step.
(d) the engine's fixed cost per local step: a tiny model (Linear-BatchNorm-Linear, batch 8), whose
    kernels take microseconds, engine step minus bare step. On a GPU, where a step takes
    milliseconds, this is the part that does not shrink with the model.

Each repeat runs every loop for one short block, in a shuffled order, after a barrier, on every
rank; a ratio is taken per repeat (blocks of the same repeat ran under the same load), and the
figure is the median over repeats with the interquartile range and the extremes. (a) and (d) use
the CPU time of each rank's process: with more ranks than cores, the wall clock of a block mostly
says which rank the scheduler ran (the wall-clock ratio is printed too). Rounds and raw all_reduces
alternate the same way, 5 of each per repeat (their median), each after a barrier on the engine's
process group (a barrier on another group than the timed collective's favours that collective).
Both step loops do the same math (SGD with momentum, gradient clipping at 1.0). On a shared
machine the spread is the other processes' load: compare runs by their medians, and read the
spread.

    python benchmarks/bench_engine.py --ranks 4 --model resnet20_cifar
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def _timed(fn, n: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process) per call."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def bench_rank(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist

    import risgd_ext
    import risgd_models as models

    torch.manual_seed(rank)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    tiny_x, tiny_y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    loss_fn = torch.nn.functional.cross_entropy

    def new_model():
        torch.manual_seed(0)
        return models.create_model(args.model, num_classes=10)

    def new_tiny():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.BatchNorm1d(24), torch.nn.ReLU(),
                                   torch.nn.Linear(24, 3))

    def bare_loop(model, xb, yb):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return step

    def engine(block, model, batch):
        cfg = {"train_micro_batch_size_per_gpu": batch, "steps_per_print": 10**9, "gradient_clipping": 1.0,
               "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}}
        if block is not None:
            cfg["risgd"] = block
        return risgd_ext.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]

    def engine_loop(e, xb, yb):
        def step():
            loss = loss_fn(e(xb), yb)
            e.backward(loss)
            e.step()
        return step

    no_round = {"tau": 10**9}  # no round inside the timed loops
    local = engine(no_round, new_model(), args.batch)
    bare_round = engine({**no_round, "measure_divergence": False}, new_model(), args.batch).risgd
    loops = {"bare": bare_loop(new_model(), x, y), "local": engine_loop(local, x, y),
             "sync": engine_loop(engine(None, new_model(), args.batch), x, y),
             "tiny_bare": bare_loop(new_tiny(), tiny_x, tiny_y),
             "tiny_local": engine_loop(engine(no_round, new_tiny(), 8), tiny_x, tiny_y)}
    steps = {k: args.steps if not k.startswith("tiny") else args.tiny_steps for k in loops}
    for name, fn in loops.items():  # warm-up
        _timed(fn, 3 if not name.startswith("tiny") else 20)

    ctl = local.risgd
    group = ctl.group
    rng = random.Random(0)  # the same order on every rank
    times: dict[str, list[float]] = {k: [] for k in loops}
    cpu: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(args.repeats):
        order = list(loops)
        rng.shuffle(order)
        for name in order:
            dist.barrier(group=group)
            wall, used = _timed(loops[name], steps[name])
            times[name].append(wall)
            cpu[name].append(used)

    ctl.average()  # builds the buckets once
    nbytes = ctl.stats()["bytes_allreduced"]
    flat = torch.zeros(nbytes // 4)
    bare_round.average()

    def raw():
        dist.all_reduce(flat, group=group)

    rounds = {"round": ctl.average, "round_nodiv": bare_round.average, "raw_allreduce": raw}
    for name in rounds:
        times[name] = []
    for _ in range(args.repeats):
        block: dict[str, list[float]] = {k: [] for k in rounds}
        for _ in range(5):
            order = list(rounds)
            rng.shuffle(order)
            for name in order:
                dist.barrier(group=group)
                t0 = time.perf_counter()
                rounds[name]()
                block[name].append(time.perf_counter() - t0)
        for name, values in block.items():  # the median of the repeat's 5
            times[name].append(statistics.median(values))
    return {"times": times, "cpu": cpu, "bytes": nbytes}


def _spread(values: list[float], fmt: str = "{:.3f}") -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return (fmt.format(statistics.median(values)) + f"  [IQR {fmt.format(q[0])}..{fmt.format(q[2])}, "
            f"range {fmt.format(min(values))}..{fmt.format(max(values))}, n={len(values)}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4, help="CPU ranks in the gloo group (default 4)")
    parser.add_argument("--model", default="resnet20_cifar", help="timm model name (default resnet20_cifar)")
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch (default 32)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block (default 3)")
    parser.add_argument("--tiny-steps", type=int, default=100, help="steps per tiny-model block (default 100)")
    parser.add_argument("--repeats", type=int, default=10, help="repeats of the shuffled blocks (default 10)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    from risgd_hosts.local import run_ranks

    results = run_ranks(bench_rank, args.ranks, args, timeout=3600)

    def per_repeat(kind: str) -> dict[str, list[float]]:
        # blocks ran in lockstep (a barrier before each): per repeat, the mean over ranks
        names = results[0][kind]
        return {k: [statistics.fmean(r[kind][k][i] for r in results) for i in range(args.repeats)] for k in names}

    wall, cpu = per_repeat("times"), per_repeat("cpu")

    def ratio(t: dict, num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(t[num], t[den])]

    figures = {
        # CPU seconds per step: with more ranks than cores the wall clock mostly measures who was
        # scheduled; the CPU time a step takes is its cost (and equals the wall clock when ranks
        # have a core each).
        "local_over_bare_throughput": ratio(cpu, "bare", "local"),
        "local_over_bare_throughput_wall": ratio(wall, "bare", "local"),
        "round_over_raw_allreduce": ratio(wall, "round", "raw_allreduce"),
        "round_without_divergence_over_raw_allreduce": ratio(wall, "round_nodiv", "raw_allreduce"),
        "sync_over_local_step_time": ratio(wall, "sync", "local"),
        "fixed_cost_per_local_step_us": [1e6 * (a - b) for a, b in zip(cpu["tiny_local"], cpu["tiny_bare"])],
    }
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    nbytes = results[0]["bytes"]
    print(f"{args.ranks} CPU ranks (gloo), {args.model}, batch {args.batch}/rank, {nbytes / 2**20:.2f} MiB averaged "
          f"per round; medians over {args.repeats} repeats (rounds: 5 per repeat)")
    print(f"  step time  bare PyTorch {med['bare'] * 1e3:8.2f} ms | risgd local {med['local'] * 1e3:8.2f} ms | "
          f"DeepSpeed sync {med['sync'] * 1e3:8.2f} ms  (wall)")
    print(f"  step CPU   bare PyTorch {med_cpu['bare'] * 1e3:8.2f} ms | risgd local {med_cpu['local'] * 1e3:8.2f} ms")
    print(f"  round      risgd average {med['round'] * 1e3:7.2f} ms | without divergence "
          f"{med['round_nodiv'] * 1e3:7.2f} ms | raw all_reduce {med['raw_allreduce'] * 1e3:7.2f} ms")
    print(f"  tiny model bare {med_cpu['tiny_bare'] * 1e6:7.1f} us/step | "
          f"risgd local {med_cpu['tiny_local'] * 1e6:7.1f} us/step  (CPU)")
    print(f"(a) local-step throughput / bare loop      = {_spread(figures['local_over_bare_throughput'])}"
          "  (goal >= 0.97; CPU time)")
    print(f"    same, wall clock                       = {_spread(figures['local_over_bare_throughput_wall'])}")
    print(f"(b) averaging round / raw flat all_reduce   = {_spread(figures['round_over_raw_allreduce'])}"
          "  (goal <= 1.15)")
    print(f"    same, measure_divergence=false         = "
          f"{_spread(figures['round_without_divergence_over_raw_allreduce'])}")
    print(f"(c) synchronous step / local step           = {_spread(figures['sync_over_local_step_time'])}")
    fixed = _spread(figures["fixed_cost_per_local_step_us"], "{:.1f}")
    print(f"(d) fixed cost per local step (tiny model)  = {fixed} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds_median": med, "cpu_seconds_median": med_cpu, "bytes": nbytes,
                       "figures_median": {k: statistics.median(v) for k, v in figures.items()},
                       "figures": figures, "seconds": wall, "cpu_seconds": cpu}, f, indent=2)


if __name__ == "__main__":
    main()
