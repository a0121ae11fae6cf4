"""Time one averaging round, and the per-message latency, on the network the ranks run on.

    deepspeed --num_gpus 4 benchmarks/round_probe.py --out probe.json     # or under hosts.netns_cluster

Builds the model train.py builds for the digits recipe and averages it with the engine's own
``risgd_ext.round.Averaging`` (the code path of an RI-SGD round: parameters and BatchNorm buffers in one flat
buffer, one in-place all_reduce per bucket, divergence measured). A barrier precedes every timed
collective, so the time is the collective's own and not the wait for a rank still computing, which
a round inside training also contains. The latency L of the alpha-beta model is a one-float
all_reduce divided by its 2(N-1) messages. Rank 0 writes the times to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    parser.add_argument("--model", default="resnet8_digits", help="model whose state is averaged")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10, help="timed averaging rounds (default 10)")
    parser.add_argument("--pings", type=int, default=20, help="timed one-float all_reduces (default 20)")
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--compress", choices=("none", "bf16", "int8", "int4"), default="none",
                        help="the round's codec (default none); the plain all_reduce it alternates with stays fp32, "
                             "so the two times are the compressed round against one fp32 all_reduce of the model")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    args = parser.parse_args(argv)

    import os

    import torch
    import torch.distributed as dist

    import risgd_models as models
    from risgd_common.layout import Layout
    from risgd_ext.round import Averaging, Live

    if "OMP_NUM_THREADS" not in os.environ:  # as train.py: ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    dist.init_process_group("gloo")
    n = dist.get_world_size()
    torch.manual_seed(0)  # the same model on every rank, as DeepSpeed's broadcast leaves it (the first anchor)
    model = models.create_model(args.model, num_classes=args.num_classes)
    torch.manual_seed(1 + dist.get_rank())  # then ranks drift apart, as they do before a round
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    from risgd_ext.codec import make_codec

    averaging = Averaging.build(params, buffers, int(args.bucket_mb * 2**20), Layout(n), dist.get_rank(),
                                codec=make_codec(args.compress), error_feedback=args.compress != "none")
    everyone = Live.without(frozenset(), n)

    tiny = torch.zeros(1)
    pings = []
    for _ in range(args.pings + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(tiny)
        pings.append(time.perf_counter() - t0)
    # Rounds and plain all_reduces of the same bytes alternate, so both see the same conditions;
    # what a round adds on top of the plain collective is the engine's own work.
    flat = torch.cat(averaging.model.buffers)
    rounds, raw, nbytes = [], [], 0
    for _ in range(args.rounds + 1):  # the first of each is a warm-up
        for p in params:
            p.data.add_(torch.randn_like(p), alpha=1e-3)  # a fresh local step's worth of drift
        dist.barrier()
        t0 = time.perf_counter()
        r = averaging.round(everyone)
        sent, _, _ = r.start(), r.wait(), r.apply()
        rounds.append(time.perf_counter() - t0)
        nbytes = sent.bytes_sent
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        raw.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        out = {"ranks": n, "compress": args.compress, "round_bytes": nbytes, "round_seconds": rounds[1:],
               "round_seconds_min": min(rounds[1:]), "round_seconds_median": statistics.median(rounds[1:]),
               "allreduce_seconds_median": statistics.median(raw[1:]),
               "ping_seconds_median": statistics.median(pings[1:]),
               "latency_s": statistics.median(pings[1:]) / (2 * (n - 1)) if n > 1 else 0.0}
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
