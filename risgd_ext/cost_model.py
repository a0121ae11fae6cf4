"""Communication cost model: when do local steps pay off, and which tau to pick.

The alpha-beta model of a ring all-reduce: S bytes over N ranks at link bandwidth B (bytes/s) with
per-message latency L take ``2(N-1) L + 2(N-1)/N * S / B`` seconds (the survey in shared/papers).
A synchronous step costs compute + one all-reduce of the gradients; a local step costs compute
alone; RI-SGD adds one all-reduce of the parameters (and BatchNorm buffers) every tau steps.
Compute per step depends on the batch policy: ``split`` keeps the base batch (compute as SyncSGD),
``per_chunk`` draws a base batch from each of the q chunks (about q times the compute): give the
time you measured for the policy you run.

    python -m risgd_ext.cost_model --nodes 8 --model resnet50 --bandwidth-gbit 10 --compute-ms 120
    python -m risgd_ext.cost_model --nodes 8 --model resnet50 --bandwidth-gbit 10 --compute-ms 120 \\
        --risgd-compute-ms 200     # e.g. the per_chunk policy, measured
    python -m risgd_ext.cost_model --nodes 8 --model-bytes 2647016 --bandwidth-gbit 1 --compute-ms 20

The library functions take the bytes one all-reduce moves. On the command line ``--model NAME``
is looked up in timm's registry (timm's own models, e.g. resnet50); for any other model, e.g. the
CIFAR ResNets of risgd_models, pass its size with ``--model-bytes N``, from
``python -c "import risgd_models; print(risgd_models.model_bytes('resnet44_cifar'))"``.

train.py logs the same prediction for its own run (``summary.json``, key ``cost_model``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass


def ring_seconds(nbytes: float, ranks: int, bandwidth_bytes_s: float, latency_s: float,
                 collectives: int = 1) -> float:
    """Time of ``collectives`` ring all-reduces moving ``nbytes`` of payload in total."""
    if ranks <= 1:
        return 0.0
    return collectives * 2 * (ranks - 1) * latency_s + 2 * (ranks - 1) / ranks * nbytes / bandwidth_bytes_s


def ring_allreduce_seconds(nbytes: float, ranks: int, bandwidth_bytes_s: float, latency_s: float) -> float:
    """One ring all-reduce of ``nbytes``: ``2(N-1) L + 2(N-1)/N * S / B``."""
    return ring_seconds(nbytes, ranks, bandwidth_bytes_s, latency_s)


def effective_bandwidth(comm_seconds: float, nbytes: float, collectives: int, ranks: int, latency_s: float) -> float:
    """Bytes/s that explain measured communication time, given the latency (inf if latency explains it)."""
    if ranks <= 1 or nbytes <= 0:
        return math.inf
    transfer_s = comm_seconds - collectives * 2 * (ranks - 1) * latency_s
    return 2 * (ranks - 1) / ranks * nbytes / transfer_s if transfer_s > 0 else math.inf


def predict_run_seconds(noncomm_s_per_step: float, steps: int, nbytes: float, collectives: int, ranks: int,
                        bandwidth_bytes_s: float, latency_s: float) -> float:
    """Wall-clock of a run: its steps' compute plus its collectives (counts, bytes) on this network."""
    return steps * noncomm_s_per_step + ring_seconds(nbytes, ranks, bandwidth_bytes_s, latency_s, collectives)


@dataclass
class Prediction:
    allreduce_s: float          # one all-reduce of the model's bytes: a sync step's gradients, or one round
    sync_step_s: float          # compute + gradient all-reduce
    local_step_s: float         # compute only (RI-SGD's batch policy)
    risgd_step_s: float         # local step + one average every tau steps, per step
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
            tau: int, target_share: float = 0.1, risgd_compute_s: float | None = None) -> Prediction:
    """Predicted step times for ``ranks`` data-parallel ranks.

    ``compute_s`` is a synchronous step's compute; ``risgd_compute_s`` a local step's under the
    RI-SGD batch policy (default: the same, as for the ``split`` policy).
    """
    local = compute_s if risgd_compute_s is None else risgd_compute_s
    allreduce = ring_allreduce_seconds(model_bytes, ranks, bandwidth_gbit * 1e9 / 8, latency_s)
    sync = compute_s + allreduce
    risgd = local + allreduce / tau
    return Prediction(allreduce, sync, local, risgd, allreduce / sync, (allreduce / tau) / risgd,
                      sync / risgd, recommend_tau(local, allreduce, target_share))


def advise(stats: dict, bandwidth_gbit: float, latency_s: float, target_share: float, tau: int) -> dict:
    """The prediction for a run, from its engine accounting (``engine.risgd.stats()``).

    Compute per step and bytes per collective are this run's measurements. With
    ``bandwidth_gbit=0`` the bandwidth is the one that explains the run's measured collectives (at
    the given latency); otherwise the prediction is for that network. ``tau`` (>= 1) is the local
    steps per round to predict for: the run's own, or for a synchronous run the tau it is weighed
    against ("what RI-SGD at this tau would do here").
    """
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an int >= 1, got {tau!r}: pass the local steps per round to predict for")
    steps, ranks = stats["steps"], stats["world_size"]
    collectives = stats["comm_rounds"]
    compute_s = stats["compute_seconds"] / steps if steps else 0.0
    nbytes = stats["bytes_allreduced"] / collectives if collectives else 0.0
    source = "given"
    if bandwidth_gbit <= 0:
        bandwidth = effective_bandwidth(stats["comm_seconds"], stats["bytes_allreduced"], collectives, ranks,
                                        latency_s)
        bandwidth_gbit, source = bandwidth * 8 / 1e9, "measured"
    finite = math.isfinite(bandwidth_gbit)  # inf: latency alone explains the measurement (or one rank)
    out: dict = {"bandwidth_gbit": bandwidth_gbit if finite else None, "bandwidth_source": source,
                 "latency_us": latency_s * 1e6, "ranks": ranks, "tau": tau, "compute_s_per_step": compute_s,
                 "bytes_per_allreduce": nbytes}
    if compute_s > 0 and nbytes > 0 and finite and ranks > 1:
        out.update(asdict(predict(compute_s, nbytes, ranks, bandwidth_gbit, latency_s, tau, target_share)))
    return out


def format_prediction(p: Prediction) -> str:
    return "\n".join(f"  {k:<18} {v:.4f}" if isinstance(v, float) else f"  {k:<18} {v}" for k, v in asdict(p).items())


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line ``error: ...`` and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    script = os.path.basename(sys.argv[0])
    prog = script if script == "risgd-cost-model" else "python -m risgd_ext.cost_model"
    parser = _Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True, help="data-parallel ranks in the ring (N)")
    parser.add_argument("--model", default="resnet50",
                        help="a model name timm's registry knows, whose fp32 parameters and floating-point "
                             "buffers one round averages (default resnet50)")
    parser.add_argument("--model-bytes", type=int, default=None,
                        help="bytes one all-reduce moves; takes precedence over --model (for models timm does "
                             "not know, e.g. risgd_models.model_bytes('resnet44_cifar'))")
    parser.add_argument("--bandwidth-gbit", type=float, required=True, help="link bandwidth in Gbit/s")
    parser.add_argument("--latency-us", type=float, default=50.0, help="per-message latency in us (default 50)")
    parser.add_argument("--compute-ms", type=float, required=True,
                        help="measured compute time of one synchronous step (forward+backward+update) in ms")
    parser.add_argument("--risgd-compute-ms", type=float, default=None,
                        help="measured compute of one RI-SGD local step under its batch policy (default: "
                             "--compute-ms, as for 'split'; 'per_chunk' takes about q times as long)")
    parser.add_argument("--tau", type=int, default=50, help="local steps per round (default 50)")
    parser.add_argument("--target-share", type=float, default=0.1,
                        help="communication share to stay under when recommending tau (default 0.1)")
    args = parser.parse_args(argv)
    for flag, ok in (("--nodes", args.nodes >= 1), ("--bandwidth-gbit", args.bandwidth_gbit > 0),
                     ("--latency-us", args.latency_us >= 0), ("--compute-ms", args.compute_ms > 0),
                     ("--risgd-compute-ms", args.risgd_compute_ms is None or args.risgd_compute_ms > 0),
                     ("--tau", args.tau >= 1), ("--target-share", 0 < args.target_share < 1),
                     ("--model-bytes", args.model_bytes is None or args.model_bytes > 0)):
        if not ok:
            parser.error(f"{flag} {getattr(args, flag[2:].replace('-', '_')):g} is out of range")
    if args.model_bytes is not None:
        nbytes, label = args.model_bytes, f"{args.model_bytes} bytes"
    else:
        # The name is resolved here, at the command line's edge, in timm's registry alone: the engine
        # imports no model zoo, and imports timm only when this command names a model.
        import timm

        if not timm.is_model(args.model):
            print(f"error: unknown model '{args.model}' for timm: pass --model-bytes N (python -c \"import "
                  f"risgd_models; print(risgd_models.model_bytes('{args.model}'))\")", file=sys.stderr)
            return 2
        model = timm.create_model(args.model, pretrained=False)
        tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
        nbytes, label = 4 * sum(t.numel() for t in tensors), args.model
    p = predict(args.compute_ms / 1e3, nbytes, args.nodes, args.bandwidth_gbit, args.latency_us / 1e6, args.tau,
                args.target_share, None if args.risgd_compute_ms is None else args.risgd_compute_ms / 1e3)
    print(f"{label}: {nbytes / 2**20:.1f} MiB per all-reduce; {args.nodes} ranks at {args.bandwidth_gbit:g} "
          f"Gbit/s, {args.latency_us:g} us latency, {args.compute_ms:g} ms compute per step")
    print(format_prediction(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
