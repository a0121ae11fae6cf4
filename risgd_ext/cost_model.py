"""Communication cost model: when do local steps pay off, and which tau to pick.

Ring all-reduce of S bytes over N ranks at bandwidth B (bytes/s) with per-message latency L takes
``2(N-1) L + 2(N-1)/N * S / B`` seconds (the survey in shared/papers). A synchronous step costs
compute + one all-reduce of the gradients; a local step costs compute alone; a round of RI-SGD
costs one all-reduce of the parameters every tau steps.

    python -m risgd_ext.cost_model --nodes 8 --model resnet50 --bandwidth-gbit 10 --compute-ms 120
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass


def ring_allreduce_seconds(nbytes: float, ranks: int, bandwidth_bytes_s: float, latency_s: float) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * latency_s + 2 * (ranks - 1) / ranks * nbytes / bandwidth_bytes_s


@dataclass
class Prediction:
    allreduce_s: float          # one all-reduce of the model's bytes
    sync_step_s: float          # compute + gradient all-reduce
    local_step_s: float         # compute only
    risgd_step_s: float         # compute + one average every tau steps, per step
    sync_comm_share: float
    risgd_comm_share: float
    speedup_per_step: float     # sync step time / RI-SGD step time
    recommended_tau: int        # smallest tau whose communication share is <= the target


def recommend_tau(compute_s: float, allreduce_s: float, target_share: float) -> int:
    """Smallest tau with ``allreduce/tau / (compute + allreduce/tau) <= target_share``."""
    if allreduce_s <= 0:
        return 1
    if compute_s <= 0 or not 0 < target_share < 1:
        raise ValueError("compute time must be > 0 and the target share in (0, 1)")
    return max(1, math.ceil(allreduce_s * (1 - target_share) / (target_share * compute_s) - 1e-12))


def predict(compute_s: float, model_bytes: float, ranks: int, bandwidth_gbit: float, latency_s: float,
            tau: int, target_share: float = 0.1) -> Prediction:
    """Predicted step and round times for a cluster of ``ranks`` data-parallel ranks."""
    allreduce = ring_allreduce_seconds(model_bytes, ranks, bandwidth_gbit * 1e9 / 8, latency_s)
    sync = compute_s + allreduce
    risgd = compute_s + allreduce / tau
    return Prediction(allreduce, sync, compute_s, risgd, allreduce / sync, (allreduce / tau) / risgd,
                      sync / risgd, recommend_tau(compute_s, allreduce, target_share))


def model_bytes(name: str) -> int:
    """fp32 bytes averaged per round: parameters plus floating-point buffers (BatchNorm statistics)."""
    import timm

    import models  # noqa: F401  (registers the CIFAR ResNets)

    model = timm.create_model(name, pretrained=False)
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return 4 * sum(t.numel() for t in tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True, help="data-parallel ranks in the ring (N)")
    parser.add_argument("--model", default="resnet50", help="timm model name (default resnet50)")
    parser.add_argument("--bandwidth-gbit", type=float, required=True, help="link bandwidth in Gbit/s")
    parser.add_argument("--latency-us", type=float, default=50.0, help="per-message latency in us (default 50)")
    parser.add_argument("--compute-ms", type=float, required=True,
                        help="measured compute time of one step (forward+backward+update) in ms")
    parser.add_argument("--tau", type=int, default=50, help="local steps per round (default 50)")
    parser.add_argument("--target-share", type=float, default=0.1,
                        help="communication share to stay under when recommending tau (default 0.1)")
    args = parser.parse_args(argv)
    nbytes = model_bytes(args.model)
    p = predict(args.compute_ms / 1e3, nbytes, args.nodes, args.bandwidth_gbit, args.latency_us / 1e6, args.tau,
                args.target_share)
    print(f"{args.model}: {nbytes / 2**20:.1f} MiB per all-reduce; {args.nodes} ranks at {args.bandwidth_gbit:g} "
          f"Gbit/s, {args.latency_us:g} us latency, {args.compute_ms:g} ms compute per step")
    for key, value in asdict(p).items():
        print(f"  {key:<18} {value:.4f}" if isinstance(value, float) else f"  {key:<18} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
