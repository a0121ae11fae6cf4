"""Distributed evaluation against rank-0 evaluation, side by side in one process group.

    python benchmarks/bench_eval.py --ranks 4 --test-images 4000

On CIFAR-format test images written here (no download) and ResNet-20, each repeat times:
  rank0  rank 0 evaluates the whole test set while the other ranks wait (what train.py did before)
  dist   every rank evaluates its slice and the counts are all-reduced (train.py now)
and checks that both give exactly the same accuracy. Prints the medians, their spread over the
repeats, and the ratio. The ranks share this machine's cores: with C cores and p ranks the best
possible ratio is min(p, C), not p.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _rank(rank: int, world_size: int, shards: str, repeats: int, batch: int) -> dict:
    import torch
    import torch.distributed as dist

    import risgd_models
    from risgd_data.loader import make_eval_loader
    from risgd_data.transforms import eval_transform
    from risgd_trainer.evaluation import evaluate

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = risgd_models.create_model("resnet20_cifar", num_classes=10)
    device = torch.device("cpu")
    transform = eval_transform("cifar10")
    whole = make_eval_loader(shards, batch, transform=transform)
    mine = make_eval_loader(shards, batch, transform=transform, rank=rank, world_size=world_size)
    times: dict[str, list[float]] = {"rank0": [], "dist": []}
    accs: dict[str, float] = {}
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:  # evaluate alone: no all_reduce of the counts
            accs["rank0"] = evaluate(model, whole, device, 10, reduce=False)["test_acc"]
        dist.barrier()  # the other ranks wait here, as they waited at the next round before
        times["rank0"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        accs["dist"] = evaluate(model, mine, device, 10)["test_acc"]
        dist.barrier()
        times["dist"].append(time.perf_counter() - t0)
    dist.destroy_process_group()
    return {"times": times, "accs": accs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4, help="ranks (default 4)")
    parser.add_argument("--test-images", type=int, default=4000, help="CIFAR-format test images (default 4000)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats, alternating the two (default 5)")
    parser.add_argument("--batch", type=int, default=256, help="evaluation batch (default 256)")
    args = parser.parse_args(argv)
    if args.ranks < 1 or args.test_images < args.ranks or args.repeats < 1 or args.batch < 1:
        print("error: need --ranks >= 1, --test-images >= --ranks, --repeats >= 1 and --batch >= 1", file=sys.stderr)
        return 2

    from risgd_data.make_shards import make_shards
    from risgd_data.synthetic import write_cifar_tarball
    from risgd_hosts.local import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        src = write_cifar_tarball(os.path.join(tmp, "cifar-10-python.tar.gz"), n_train=100,
                                  n_test=args.test_images)
        shards = os.path.join(tmp, "shards")
        make_shards("cifar10", shards, src=src, progress=False)
        results = run_ranks(_rank, args.ranks, shards, args.repeats, args.batch, timeout=3600)
    r0 = results[0]
    med = {k: statistics.median(v) for k, v in r0["times"].items()}
    print(f"{args.ranks} ranks on {os.cpu_count()} cores, ResNet-20, {args.test_images} CIFAR-format test images, "
          f"{args.repeats} repeats")
    for key, label in (("rank0", "rank 0 evaluates everything"), ("dist", "every rank its slice")):
        ts = r0["times"][key]
        print(f"  {label:<28} median {med[key]:.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})  "
              f"acc {r0['accs'][key]:.2f}")
    same = r0["accs"]["rank0"] == r0["accs"]["dist"] and all(r["accs"]["dist"] == r0["accs"]["dist"] for r in results)
    print(f"  same accuracy on every rank and as rank-0 evaluation: {'yes' if same else 'NO'}")
    print(f"  evaluation wall time, rank 0 alone / distributed: {med['rank0'] / med['dist']:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
