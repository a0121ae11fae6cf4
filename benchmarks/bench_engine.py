"""Engine overhead benchmark: ratios measured side by side in one run on N CPU ranks (gloo).

(a) local-step throughput of a risgd_ext engine / the same loop in plain PyTorch (no DeepSpeed,
    no torch.distributed): goal >= 0.97.
(b) one averaging round / one raw ``dist.all_reduce`` of a single flat buffer of the same bytes:
    goal <= 1.15.
(c) a synchronous DeepSpeed step (gradient all-reduce) / a local step.

The loops alternate in short blocks on every rank and each side keeps its fastest block (as timeit
does): on a shared machine noise only ever adds time, so the minimum is the cleanest estimate of
the cost itself. Both step loops do the same math (SGD with momentum, gradient clipping at 1.0).

    python benchmarks/bench_engine.py --ranks 4 --model resnet20_cifar
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_rank(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist

    import risgd_ext
    import risgd_models as models

    torch.manual_seed(rank)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = torch.nn.functional.cross_entropy

    def new_model():
        torch.manual_seed(0)
        return models.create_model(args.model, num_classes=10)

    bare = new_model()
    bare_opt = torch.optim.SGD(bare.parameters(), lr=0.01, momentum=0.9)

    def bare_step():
        loss = loss_fn(bare(x), y)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
        bare_opt.step()

    def engine(block):
        cfg = {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": 10**9, "gradient_clipping": 1.0,
               "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}}
        if block is not None:
            cfg["risgd"] = block
        model = new_model()
        return risgd_ext.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]

    local = engine({"tau": 10**9})  # no round inside the timed loops
    bare_round = engine({"tau": 10**9, "measure_divergence": False}).risgd
    sync = engine(None)

    def engine_step(e):
        def step():
            loss = loss_fn(e(x), y)
            e.backward(loss)
            e.step()
        return step

    local_step, sync_step = engine_step(local), engine_step(sync)
    for fn in (bare_step, local_step, sync_step):  # warm-up
        _timed(fn, 3)

    t_bare, t_local, t_sync = [], [], []
    for _ in range(args.repeats):
        dist.barrier()
        t_bare.append(_timed(bare_step, args.steps))
        dist.barrier()
        t_local.append(_timed(local_step, args.steps))
        dist.barrier()
        t_sync.append(_timed(sync_step, args.steps))

    ctl = local.risgd
    ctl.average()  # builds the buckets once
    nbytes = ctl.stats()["bytes_allreduced"]
    flat = torch.zeros(nbytes // 4)
    bare_round.average()
    t_round, t_round_nodiv, t_raw = [], [], []
    for _ in range(args.repeats * 5):
        dist.barrier()
        t0 = time.perf_counter()
        ctl.average()
        t_round.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        bare_round.average()
        t_round_nodiv.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        t_raw.append(time.perf_counter() - t0)
    return {"bare": min(t_bare), "local": min(t_local), "sync": min(t_sync), "round": min(t_round),
            "round_nodiv": min(t_round_nodiv),
            "raw_allreduce": min(t_raw), "bytes": nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4, help="CPU ranks in the gloo group (default 4)")
    parser.add_argument("--model", default="resnet20_cifar", help="timm model name (default resnet20_cifar)")
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch (default 32)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="alternating blocks per loop (default 10)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    from risgd_hosts.local import run_ranks

    results = run_ranks(bench_rank, args.ranks, args, timeout=1800)
    mean = {k: statistics.fmean(r[k] for r in results) for k in results[0]}
    figures = {
        "local_over_bare_throughput": mean["bare"] / mean["local"],
        "round_over_raw_allreduce": mean["round"] / mean["raw_allreduce"],
        "round_without_divergence_over_raw_allreduce": mean["round_nodiv"] / mean["raw_allreduce"],
        "sync_over_local_step_time": mean["sync"] / mean["local"],
    }
    print(f"{args.ranks} CPU ranks (gloo), {args.model}, batch {args.batch}/rank, "
          f"{mean['bytes'] / 2**20:.2f} MiB averaged per round")
    print(f"  step time  bare PyTorch {mean['bare'] * 1e3:8.2f} ms | risgd local {mean['local'] * 1e3:8.2f} ms | "
          f"DeepSpeed sync {mean['sync'] * 1e3:8.2f} ms")
    print(f"  round      risgd average {mean['round'] * 1e3:7.2f} ms | "
          f"raw all_reduce {mean['raw_allreduce'] * 1e3:7.2f} ms")
    print(f"(a) local-step throughput / bare loop      = {figures['local_over_bare_throughput']:.3f}  (goal >= 0.97)")
    print(f"(b) averaging round / raw flat all_reduce   = {figures['round_over_raw_allreduce']:.3f}  (goal <= 1.15)")
    print(f"    same, measure_divergence=false         = "
          f"{figures['round_without_divergence_over_raw_allreduce']:.3f}")
    print(f"(c) synchronous step / local step           = {figures['sync_over_local_step_time']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds": mean, "figures": figures}, f, indent=2)


if __name__ == "__main__":
    main()
