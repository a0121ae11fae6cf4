"""The planner's model: when do local steps pay off, which tau, codec and node level to run.

The alpha-beta model of a ring all-reduce: S bytes over N ranks at link bandwidth B (bytes/s) with
per-message latency L take ``2(N-1) L + 2(N-1)/N * S / B`` seconds (the ring model of Liu and
Zhang's survey of distributed learning).
A synchronous step costs compute + one all-reduce of the gradients; a local step costs compute
alone; RI-SGD adds one all-reduce of the parameters (and BatchNorm buffers) every tau steps.
Compute per step depends on the batch policy: ``split`` keeps the base batch (compute as SyncSGD),
``per_chunk`` draws a base batch from each of the q chunks (about q times the compute): pass the
time measured for the policy a run uses.

The functions take the bytes one all-reduce moves (no model zoo is imported). With a node level
(M nodes of k ranks) a round is ``hierarchical_round_seconds`` and a step ``predict_hierarchical``;
compressed rounds move a codec's payload (``payload_bytes``, from the engine's codec registry
``risgd_ext.codec.CODECS``, the one place a codec's bytes are written). :func:`plan` weighs the
configurations a run can use (node level or not, codec) and picks one with its tau; :func:`advise`
is the prediction for a finished run from its engine accounting (the trainer writes it into
``summary.json`` as ``cost_model``). The command line that prints all of it is
:mod:`risgd_planner.cli` (``risgd-cost-model``).

The model has no accuracy term: a tau above ``MEASURED_TAU_MAX`` (200, the largest tau the project
measured for accuracy, where accuracy already falls) is an answer about time alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

from risgd_common.layout import Layout, LayoutError
from risgd_ext.codec import CODECS


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


def _check_count(name: str, value: int, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


class RoundParts(NamedTuple):
    """The three phases of a hierarchical round, in seconds (see ``hierarchical_round_seconds``)."""

    intra: float    # the node's ranks all-reduce the full payload first (not node-synchronous only)
    cross: float    # the slices' all-reduces between nodes: the only inter-node traffic
    bcast: float    # the slices broadcast inside the node


def hierarchical_round_parts(nbytes: float, nodes: int, ranks_per_node: int, inter_bandwidth_bytes_s: float,
                             inter_latency_s: float, intra_bandwidth_bytes_s: float = math.inf,
                             intra_latency_s: float = 0.0, node_synchronous: bool = True,
                             compress: str = "none") -> RoundParts:
    """``hierarchical_round_seconds`` by phase: ``RoundParts(intra, cross, bcast)``, which sum to it. With a
    ``compress`` codec the cross-node phase moves the codec's payload (``round_seconds``: the two-phase
    compressed all-reduce); the phases inside the node stay fp32, as the engine runs them."""
    _check_count("nodes", nodes, 1)
    _check_count("ranks_per_node", ranks_per_node, 1)
    k = ranks_per_node
    cross = round_seconds(nbytes, nodes, inter_bandwidth_bytes_s, inter_latency_s, compress)
    if k == 1:
        return RoundParts(0.0, cross, 0.0)
    intra = 0.0 if node_synchronous else ring_seconds(nbytes, k, intra_bandwidth_bytes_s, intra_latency_s)
    return RoundParts(intra, cross, k * (k - 1) * intra_latency_s + nbytes / intra_bandwidth_bytes_s)


def hierarchical_round_seconds(nbytes: float, nodes: int, ranks_per_node: int, inter_bandwidth_bytes_s: float,
                               inter_latency_s: float, intra_bandwidth_bytes_s: float = math.inf,
                               intra_latency_s: float = 0.0, node_synchronous: bool = True,
                               compress: str = "none") -> float:
    """One hierarchical all-reduce of ``nbytes`` (S) over ``nodes`` (M) nodes of ``ranks_per_node`` (k) ranks.

    With B, L the inter-node link and b, l the intra-node link (all terms of a ring over 1 rank are 0)::

        intra  = 2(k-1) l + 2(k-1)/k * S / b   only if not node_synchronous: the node's ranks first
                                               all-reduce the full S (their parameters differ)
        cross  = 2(M-1) L + 2(M-1)/M * S / B   rank i of each node all-reduces its slice S/k with rank i
                                               of the other nodes: k rings of M nodes at once, sharing
                                               the node's one link (2(M-1)/M * S bytes on it in all),
                                               their latencies counted once (the rings run concurrently)
        bcast  = k (k-1) l + S / b             k broadcasts of the slices S/k inside the node, one after
                                               another, each (k-1) l + (S/k) / b; always when k > 1
        round  = intra + cross + bcast

    With ``ranks_per_node == 1`` this is ``ring_seconds(nbytes, nodes, inter_bandwidth_bytes_s,
    inter_latency_s)``, the flat ring over the nodes. ``hierarchical_round_parts`` gives the phases.
    """
    return sum(hierarchical_round_parts(nbytes, nodes, ranks_per_node, inter_bandwidth_bytes_s, inter_latency_s,
                                        intra_bandwidth_bytes_s, intra_latency_s, node_synchronous, compress))


def exposed_seconds(round_s: float, hide_s: float) -> float:
    """The part of a background transfer of ``round_s`` seconds that a window of ``hide_s`` seconds of
    compute does not hide: ``max(0, round_s - hide_s)``."""
    return max(0.0, round_s - hide_s)


def exposed_round_seconds(parts: RoundParts, hide_s: float, overlap: bool = True) -> float:
    """What the steps wait for of one round: all of it without overlap; with overlap
    ``intra + bcast + max(0, cross - hide_s)``: only the cross-node all-reduce runs in the background
    (as the engine does it: the intra-node sum before it and the broadcasts after it block)."""
    if not overlap:
        return sum(parts)
    return parts.intra + parts.bcast + exposed_seconds(parts.cross, hide_s)


def predict_hierarchical_run_seconds(noncomm_s_per_step: float, steps: int, round_bytes: float, rounds: int,
                                     nodes: int, ranks_per_node: int, inter_bandwidth_bytes_s: float,
                                     inter_latency_s: float, *, intra_bandwidth_bytes_s: float = math.inf,
                                     intra_latency_s: float = 0.0, node_synchronous: bool = True,
                                     grad_allreduces: int = 0, grad_allreduce_bytes: float = 0.0,
                                     intra_rounds: int = 0, overlap: bool = False, delay_steps: int | None = None,
                                     round_overhead_s: float = 0.0) -> float:
    """Predicted wall-clock of a run on ``nodes`` (M) nodes of ``ranks_per_node`` (k) ranks.

    The run: ``steps`` steps of ``noncomm_s_per_step`` (c) seconds each; ``rounds`` inter-node rounds of
    ``round_bytes`` (S) each, R = intra + cross + bcast = ``hierarchical_round_seconds(S, M, k, ...,
    node_synchronous)`` (phases: ``hierarchical_round_parts``);
    ``grad_allreduces`` blocking intra-node gradient all-reduces of ``grad_allreduce_bytes`` (G) each
    (node-synchronous: typically one per step); ``intra_rounds`` blocking intra-node parameter
    averages of S (tau_intra > 0), not counting the ones inside the inter-node rounds; ``round_overhead_s``
    (o) a blocking fixed cost per round (e.g. the copy of the parameters into the send buffer)::

        T = steps * c + grad_allreduces * ring(G, k, b, l) + intra_rounds * ring(S, k, b, l)
            + rounds * o + rounds * R                                          without overlap
            + rounds * o + (rounds - 1) * E + R                                with overlap
        E = intra + bcast + max(0, cross - delay_steps * c)                    (exposed_round_seconds)

    (ring = ``ring_seconds``; no round terms when rounds == 0.) With overlap each round's cross-node
    all-reduce runs behind the next ``delay_steps`` steps' compute (the engine's default is tau: pass
    it) and a step waits only for what is left of it; the intra-node sum before it and the broadcasts
    after it block (with k = 1 both are 0 and E = max(0, R - delay_steps * c)). The last round is
    waited for in full (the run ends on it). Intra-node traffic and the background transfer are taken
    not to slow each other.

    With the defaults (k = 1, no intra-node traffic, no overlap) this is
    ``predict_run_seconds(c, steps, rounds * S, rounds, M, B, L)``.
    """
    _check_count("steps", steps, 0)
    _check_count("rounds", rounds, 0)
    _check_count("grad_allreduces", grad_allreduces, 0)
    _check_count("intra_rounds", intra_rounds, 0)
    k = ranks_per_node
    total = steps * noncomm_s_per_step
    total += grad_allreduces * ring_seconds(grad_allreduce_bytes, k, intra_bandwidth_bytes_s, intra_latency_s)
    total += intra_rounds * ring_seconds(round_bytes, k, intra_bandwidth_bytes_s, intra_latency_s)
    parts = hierarchical_round_parts(round_bytes, nodes, k, inter_bandwidth_bytes_s, inter_latency_s,
                                     intra_bandwidth_bytes_s, intra_latency_s, node_synchronous)
    if overlap:
        if delay_steps is None:
            raise ValueError("overlap needs delay_steps: the steps a round runs behind (the engine's default: tau)")
        _check_count("delay_steps", delay_steps, 0)
    if rounds:
        total += rounds * round_overhead_s
        if overlap:
            total += (rounds - 1) * exposed_round_seconds(parts, delay_steps * noncomm_s_per_step) + sum(parts)
        else:
            total += rounds * sum(parts)
    return total


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


@dataclass
class HierarchicalPrediction:
    round_s: float              # one inter-node round (hierarchical_round_seconds)
    intra_step_comm_s: float    # blocking intra-node communication per step (gradients, or intra averages)
    exposed_round_s: float      # what the steps wait for of one round (all of it, unless overlapped)
    hier_step_s: float          # local step + intra_step_comm_s + exposed_round_s / tau
    hier_comm_share: float      # (hier_step_s - local step) / hier_step_s
    speedup_vs_sync: float      # flat synchronous step (one ring over all M*k ranks) / hier_step_s
    speedup_vs_risgd: float     # flat RI-SGD step (the same tau, one ring over all ranks) / hier_step_s


def predict_hierarchical(compute_s: float, model_bytes: float, nodes: int, ranks_per_node: int,
                         bandwidth_gbit: float, latency_s: float, tau: int, *, tau_intra: int = 0,
                         intra_bandwidth_gbit: float = 100.0, intra_latency_s: float = 5e-6, overlap: bool = False,
                         overlap_delay: int | None = None, round_overhead_s: float = 0.0,
                         risgd_compute_s: float | None = None, grad_bytes: float | None = None,
                         compress: str = "none") -> HierarchicalPrediction:
    """Predicted steady-state step time on ``nodes`` (M) nodes of ``ranks_per_node`` (k) ranks.

    ``bandwidth_gbit``/``latency_s`` are the inter-node link's (B, L), ``intra_*`` the intra-node
    link's (b, l); S = ``model_bytes``, G = ``grad_bytes`` (default S), c = the local step's compute
    (``risgd_compute_s``, default ``compute_s``), D = ``overlap_delay`` (default tau), o =
    ``round_overhead_s``, ring = ``ring_seconds``::

        round_s           = hierarchical_round_seconds(S, M, k, B, L, b, l, node_synchronous=tau_intra == 0)
        intra_step_comm_s = ring(G, k, b, l)                                   tau_intra == 0 (every step)
                          = floor((tau-1)/tau_intra) * ring(S, k, b, l) / tau  tau_intra > 0 (the intra
                            averages inside a round; the one at the round's step is part of round_s)
        exposed_round_s   = o + round_s                                    without overlap
                          = o + intra + bcast + max(0, cross - D * c)      with overlap (only the
                            cross-node phase is in the background: ``exposed_round_seconds``)
        hier_step_s       = c + intra_step_comm_s + exposed_round_s / tau
        hier_comm_share   = (hier_step_s - c) / hier_step_s

    The speedups divide the flat ``predict(compute_s, S, M*k, ...)`` step times by ``hier_step_s``.
    Per step in the steady state: a run's last round, waited for in full, is not in it
    (``predict_hierarchical_run_seconds`` counts it).
    """
    _check_count("tau", tau, 1)
    _check_count("tau_intra", tau_intra, 0)
    _check_count("nodes", nodes, 1)
    _check_count("ranks_per_node", ranks_per_node, 1)
    k = ranks_per_node
    local = compute_s if risgd_compute_s is None else risgd_compute_s
    delay = tau if overlap_delay is None else overlap_delay
    _check_count("overlap_delay", delay, 0)
    inter_bw, intra_bw = bandwidth_gbit * 1e9 / 8, intra_bandwidth_gbit * 1e9 / 8
    parts = hierarchical_round_parts(model_bytes, nodes, k, inter_bw, latency_s, intra_bw, intra_latency_s,
                                     node_synchronous=tau_intra == 0, compress=compress)
    round_s = sum(parts)
    if tau_intra == 0:
        intra = ring_seconds(model_bytes if grad_bytes is None else grad_bytes, k, intra_bw, intra_latency_s)
    else:
        intra = (tau - 1) // tau_intra * ring_seconds(model_bytes, k, intra_bw, intra_latency_s) / tau
    exposed = round_overhead_s + exposed_round_seconds(parts, delay * local, overlap)
    step = local + intra + exposed / tau
    flat = predict(compute_s, model_bytes, nodes * k, bandwidth_gbit, latency_s, tau, risgd_compute_s=risgd_compute_s)
    return HierarchicalPrediction(round_s, intra, exposed, step, (step - local) / step, flat.sync_step_s / step,
                                  flat.risgd_step_s / step)


# -- the node level's tau ------------------------------------------------------------------------------------

def hierarchical_share_floor(compute_s: float, model_bytes: float, ranks_per_node: int, *, tau_intra: int = 0,
                             intra_bandwidth_gbit: float = 100.0, intra_latency_s: float = 5e-6,
                             risgd_compute_s: float | None = None, grad_bytes: float | None = None) -> float:
    """What ``hier_comm_share`` tends to as tau grows: the intra-node communication that comes every step
    (the gradient all-reduce, tau_intra 0) or every ``tau_intra`` steps, whatever the tau between the
    rounds, as a share of a step: ``i / (c + i)`` with i = ``ring(G, k, b, l)`` (tau_intra 0) or
    ``ring(S, k, b, l) / tau_intra``. No tau reaches a target share at or below it."""
    _check_count("ranks_per_node", ranks_per_node, 1)
    _check_count("tau_intra", tau_intra, 0)
    local = compute_s if risgd_compute_s is None else risgd_compute_s
    intra_bw = intra_bandwidth_gbit * 1e9 / 8
    if tau_intra == 0:
        per_step = ring_seconds(model_bytes if grad_bytes is None else grad_bytes, ranks_per_node, intra_bw,
                                intra_latency_s)
    else:
        per_step = ring_seconds(model_bytes, ranks_per_node, intra_bw, intra_latency_s) / tau_intra
    return per_step / (local + per_step)


def recommend_hierarchical_tau(compute_s: float, model_bytes: float, nodes: int, ranks_per_node: int,
                               bandwidth_gbit: float, latency_s: float, target_share: float = 0.1, *,
                               tau_intra: int = 0, intra_bandwidth_gbit: float = 100.0,
                               intra_latency_s: float = 5e-6, overlap: bool = False,
                               overlap_delay: int | None = None, round_overhead_s: float = 0.0,
                               risgd_compute_s: float | None = None, grad_bytes: float | None = None,
                               compress: str = "none") -> int | None:
    """Smallest tau whose ``predict_hierarchical(...).hier_comm_share`` is <= ``target_share``, or None
    where no tau reaches it (``hierarchical_share_floor`` is at or above it).

    The arguments are ``predict_hierarchical``'s. With ``tau_intra`` > 0 only multiples of it are
    candidates (the engine's tau is one). With overlap a round hides behind ``overlap_delay`` steps:
    None (the engine's default) is tau itself, so a larger tau also hides more of each round; a given
    delay D is taken as ``min(D, tau)`` (the engine refuses a delay above tau).

    The share falls as tau grows (over the multiples of tau_intra: the averages inside the node, one
    per tau_intra steps, cost no more than the round, which averages inside the node first), so the
    search doubles tau until the target is met, then bisects.
    """
    if not 0 < target_share < 1:
        raise ValueError(f"the target share must be in (0, 1), got {target_share!r}")
    step = max(1, tau_intra)

    def share(j: int) -> float:
        tau = j * step
        delay = None if overlap_delay is None else min(overlap_delay, tau)
        return predict_hierarchical(compute_s, model_bytes, nodes, ranks_per_node, bandwidth_gbit, latency_s, tau,
                                    tau_intra=tau_intra, intra_bandwidth_gbit=intra_bandwidth_gbit,
                                    intra_latency_s=intra_latency_s, overlap=overlap, overlap_delay=delay,
                                    round_overhead_s=round_overhead_s, risgd_compute_s=risgd_compute_s,
                                    grad_bytes=grad_bytes, compress=compress).hier_comm_share

    if share(1) <= target_share:
        return step
    floor = hierarchical_share_floor(compute_s, model_bytes, ranks_per_node, tau_intra=tau_intra,
                                     intra_bandwidth_gbit=intra_bandwidth_gbit, intra_latency_s=intra_latency_s,
                                     risgd_compute_s=risgd_compute_s, grad_bytes=grad_bytes)
    if floor >= target_share:
        return None
    low, high = 1, 2  # share(low) > target
    while share(high) > target_share:
        low, high = high, 2 * high
        if high > 2**62:  # the target a hair above the floor: no tau a run could use
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if share(mid) > target_share else (low, mid)
    return high * step


# -- compressed rounds ------------------------------------------------------------------------------
def payload_bytes(model_bytes: float, compress: str) -> float:
    """Bytes one rank contributes to a round of ``model_bytes`` fp32 bytes under codec ``compress``:
    the codec registry's own count (``risgd_ext.codec.CODECS``: fp32; bf16, half; int8, one fp32
    scale per 256 values, 4 + 256 bytes per 1,024 fp32 bytes; int4, 4 + 64 bytes per 512)."""
    return CODECS[compress].nbytes(model_bytes / 4)


def round_seconds(model_bytes: float, ranks: int, bandwidth_bytes_s: float, latency_s: float,
                  compress: str = "none") -> float:
    """One round's cross-node collective: the fp32 ring all_reduce, or (compressed) the two-phase
    all-reduce of the encoded payload (``risgd_ext.codec``: an all_to_all of the chunks to their
    owners and an all_gather of the re-encoded sums), which moves 2(N-1)/N of the payload per rank
    in 2(N-1) latency-bound steps, as the ring does: the codec's byte ratio at any number of nodes
    (int8 3.9x, int4 7.5x, bf16 2x)."""
    if compress == "none":
        return ring_allreduce_seconds(model_bytes, ranks, bandwidth_bytes_s, latency_s)
    return ring_seconds(payload_bytes(model_bytes, compress), ranks, bandwidth_bytes_s, latency_s)


@dataclass
class RoundOption:
    compress: str
    payload_bytes: float        # what one rank contributes per round, scales included
    round_s: float              # the cross-node collective (round_seconds)
    tau: int                    # smallest tau whose communication share is <= the target


def recommend_rounds(compute_s: float, model_bytes: float, ranks: int, bandwidth_gbit: float, latency_s: float,
                     target_share: float = 0.1, codecs: tuple[str, ...] | None = None
                     ) -> tuple[list[RoundOption], RoundOption]:
    """Every codec's round on this link (``codecs``: default every registered one; a variant such as
    ``topk0.01`` is priced when named) and the tau it needs; the pick is the smallest tau (a larger tau
    costs accuracy), then the fewest bytes, among the codecs whose accuracy this project measured
    (``Codec.measured_on("flat")``: a codec without it is listed, never picked)."""
    bw = bandwidth_gbit * 1e9 / 8
    options = [RoundOption(c, payload_bytes(model_bytes, c), r, recommend_tau(compute_s, r, target_share))
               for c in (codecs or tuple(CODECS)) for r in (round_seconds(model_bytes, ranks, bw, latency_s, c),)]
    measured = [o for o in options if CODECS[o.compress].measured_on("flat")]
    return options, min(measured, key=lambda o: (o.tau, o.round_s, o.payload_bytes))


def flat_round_seconds(model_bytes: float, nodes: int, ranks_per_node: int, bandwidth_bytes_s: float,
                       latency_s: float, compress: str = "none") -> float:
    """One round of a flat run (no node level: every rank a worker) on ``nodes`` (M) nodes of
    ``ranks_per_node`` (k) ranks, N = M k ranks, over the nodes' links (B, L).

    fp32 is the ring all_reduce over the N ranks (``ring_allreduce_seconds``): a ring ordered by node
    crosses each node's link once each way, which carries ``2(N-1)/N * S`` as every link of the ring
    does. A compressed round is the two-phase all-reduce over the N ranks: each rank's all_to_all and
    all_gather reach every other rank, so a node's link carries its k ranks' off-node shares,
    ``2 k (M-1)/M`` of the payload P, in ``2(N-1)`` latency steps::

        compressed = 2(N-1) L + 2 k (M-1)/M * P / B

    With k = 1 this is ``round_seconds`` (the node level's cross-node phase moves P once per node:
    ``hierarchical_round_parts``)."""
    _check_count("nodes", nodes, 1)
    _check_count("ranks_per_node", ranks_per_node, 1)
    ranks, k = nodes * ranks_per_node, ranks_per_node
    if compress == "none" or k == 1:
        return round_seconds(model_bytes, ranks, bandwidth_bytes_s, latency_s, compress)
    return 2 * (ranks - 1) * latency_s + 2 * k * (nodes - 1) / nodes * payload_bytes(model_bytes, compress) \
        / bandwidth_bytes_s


@dataclass
class Plan:
    """A configuration a run can use and the tau it needs (see :func:`plan`)."""

    node_size: int              # the recipe's node_size: ranks per node at the node level; 1: flat, no node level
    compress: str               # the rounds' codec across nodes (none: fp32)
    tau: int                    # smallest tau whose communication share is <= the target
    round_s: float              # one round: flat_round_seconds, or the node level's hierarchical round
    payload_bytes: float        # what one rank (flat) or one node (node level) sends across per round
    tau_intra: int = 0          # the node level's averages inside a node (0: its gradients every step)
    overlap: bool = False       # the rounds behind the next steps' compute
    overlap_delay: int | None = None  # steps a round runs behind; None: tau (the engine's default)

    def overrides(self) -> list[str]:
        """The recipe overrides that run it (``node_size=8 compress=int4 tau=94``), as the trainer takes them."""
        out = [f"node_size={self.node_size}", f"compress={self.compress}", f"tau={self.tau}"]
        if self.tau_intra:
            out.append(f"tau_intra={self.tau_intra}")
        if self.overlap:
            out.append("overlap=true")
            if self.overlap_delay is not None:
                out.append(f"overlap_delay={min(self.overlap_delay, self.tau)}")
        return out


def plan(compute_s: float, model_bytes: float, nodes: int, ranks_per_node: int, bandwidth_gbit: float,
         latency_s: float, target_share: float = 0.1, *, codecs: tuple[str, ...] = ("none",), tau_intra: int = 0,
         intra_bandwidth_gbit: float = 100.0, intra_latency_s: float = 5e-6, overlap: bool = False,
         overlap_delay: int | None = None, risgd_compute_s: float | None = None) -> tuple[list[Plan], Plan]:
    """The configurations a run on ``nodes`` (M) nodes of ``ranks_per_node`` (k) ranks can use, each with
    the smallest tau whose communication share is <= ``target_share``, and the one to use.

    Weighed, for each codec of ``codecs`` whose accuracy this project measured on that shape
    (``Codec.measured_on``: int2 at the node level only):

    - flat rounds, no node level and no overlap (``node_size`` 1): ``flat_round_seconds`` over the
      M k ranks, tau by ``recommend_tau`` on the local step's compute (``risgd_compute_s``, default
      ``compute_s``);
    - where k > 1 or ``overlap``: the node level (``node_size`` k) with ``tau_intra``, ``overlap`` and
      ``overlap_delay`` as given, the codec on its cross-node phase (``recommend_hierarchical_tau``; k = 1
      with overlap: flat rounds behind the steps); left out where no tau reaches the target.

    The pick is the smallest tau (the model has no accuracy term; a larger tau costs accuracy), then the
    fewest bytes across nodes per round, then the plainer configuration (flat before the node level, no
    overlap before overlap). Returns ``(every plan weighed, the pick)``."""
    _check_count("nodes", nodes, 1)
    _check_count("ranks_per_node", ranks_per_node, 1)
    measured = [c for c in codecs if CODECS[c].measured_on("flat")]
    if not measured:
        raise ValueError(f"no codec among {list(codecs)} has its accuracy measured: include none (fp32)")
    measured_node = [c for c in codecs if CODECS[c].measured_on("node")]
    local = compute_s if risgd_compute_s is None else risgd_compute_s
    bw, k = bandwidth_gbit * 1e9 / 8, ranks_per_node
    plans = []
    for c in measured:
        r = flat_round_seconds(model_bytes, nodes, k, bw, latency_s, c)
        plans.append(Plan(1, c, recommend_tau(local, r, target_share), r, payload_bytes(model_bytes, c)))
    if k > 1 or overlap:
        net = dict(tau_intra=tau_intra, intra_bandwidth_gbit=intra_bandwidth_gbit, intra_latency_s=intra_latency_s,
                   overlap=overlap, risgd_compute_s=risgd_compute_s)
        for c in measured_node:
            tau = recommend_hierarchical_tau(compute_s, model_bytes, nodes, k, bandwidth_gbit, latency_s, target_share,
                                             overlap_delay=overlap_delay, compress=c, **net)
            if tau is None:
                continue
            delay = None if overlap_delay is None else min(overlap_delay, tau)
            r = predict_hierarchical(compute_s, model_bytes, nodes, k, bandwidth_gbit, latency_s, tau,
                                     overlap_delay=delay, compress=c, **net).round_s
            plans.append(Plan(k, c, tau, r, payload_bytes(model_bytes, c), tau_intra if k > 1 else 0, overlap,
                              overlap_delay))
    pick = min(plans, key=lambda p: (p.tau, p.payload_bytes, p.node_size > 1, p.overlap))
    return plans, pick


def advise(stats: dict, bandwidth_gbit: float, latency_s: float, target_share: float, tau: int, *,
           intra_bandwidth_gbit: float = 100.0, intra_latency_s: float = 5e-6, loopback: bool = False) -> dict:
    """The prediction for a run, from its engine accounting (``engine.risgd.stats()``).

    Compute per step and bytes per collective are this run's measurements. With
    ``bandwidth_gbit=0`` the bandwidth is the one that explains the run's measured collectives (at
    the given latency); otherwise the prediction is for that network. ``tau`` (>= 1) is the local
    steps per round to predict for: the run's own, or for a synchronous run the tau it is weighed
    against ("what RI-SGD at this tau would do here").

    For a run with a node hierarchy or overlapped averaging (stats ``node_size`` > 1, or ``overlap``
    true) the output adds ``node_size``, ``nodes`` (world_size / node_size), ``tau_intra``, ``overlap``,
    ``overlap_delay`` (default tau), ``intra_bandwidth_gbit``, ``intra_latency_us``, the measured
    ``comm_wait_s_per_step`` (stats ``comm_wait_seconds`` / steps, when reported) and, when the flat
    prediction is made, the ``HierarchicalPrediction`` fields of ``predict_hierarchical`` for this
    run's compute and bytes per all-reduce on the given (or measured) inter-node bandwidth and the
    intra-node link ``intra_bandwidth_gbit``/``intra_latency_s``. A measured bandwidth is fitted with
    the flat ring over all ranks: for such a run a rough figure, better give the network's. Stats
    without those keys give the flat output alone.

    A measured bandwidth adds ``measured_on_loopback``: ``loopback`` as the caller knows it (true: every
    rank of the run on one machine, so what was measured is a loopback or a machine's own links, not a
    network; the numbers describe this run there, and are no advice for a network).
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
    if source == "measured":
        out["measured_on_loopback"] = bool(loopback)
    if compute_s > 0 and nbytes > 0 and finite and ranks > 1:
        out.update(asdict(predict(compute_s, nbytes, ranks, bandwidth_gbit, latency_s, tau, target_share)))
    node_size = stats.get("node_size", 1) or 1
    if node_size > 1 or stats.get("overlap"):
        try:
            nodes = Layout(ranks, node_size).workers
        except LayoutError:
            raise ValueError(f"world_size {ranks} is not a multiple of node_size {node_size}") from None
        overlap = bool(stats.get("overlap"))
        delay = stats.get("overlap_delay")
        delay = tau if delay is None else delay
        tau_intra = stats.get("tau_intra", 0) or 0
        out.update(node_size=node_size, nodes=nodes, tau_intra=tau_intra, overlap=overlap,
                   overlap_delay=delay if overlap else None, intra_bandwidth_gbit=intra_bandwidth_gbit,
                   intra_latency_us=intra_latency_s * 1e6)
        if "comm_wait_seconds" in stats:
            out["comm_wait_s_per_step"] = stats["comm_wait_seconds"] / steps if steps else 0.0
        if "allreduce_s" in out:
            out.update(asdict(predict_hierarchical(
                compute_s, nbytes, nodes, node_size, bandwidth_gbit, latency_s, tau, tau_intra=tau_intra,
                intra_bandwidth_gbit=intra_bandwidth_gbit, intra_latency_s=intra_latency_s, overlap=overlap,
                overlap_delay=delay)))
    if "compress" in stats and "allreduce_s" in out:
        # what to run on this link: (tau, compress) from the model's fp32 bytes, and the outer step
        fp32 = stats.get("model_bytes") or nbytes
        groups = Layout(ranks, node_size).workers
        _, pick = recommend_rounds(compute_s, fp32, groups, bandwidth_gbit, latency_s, target_share)
        out["recommend"] = {"tau": pick.tau, "compress": pick.compress, "round_s": pick.round_s,
                            "payload_bytes": pick.payload_bytes, "outer": OUTER_ADVICE}
    return out


# What the sweep on the namespace hosts measured for the outer step (docs/wide-area.md, "Rounds for wide-area
# links"); the cost model has no accuracy term, so this is advice from that measurement, not a model.
OUTER_ADVICE = ("none (outer_lr 1.0, outer_momentum 0): in the sweep the outer Nesterov step (0.7, 0.9) lost "
                "3-6 points and SlowMo's (1.0, 0.5) up to 6; an extrapolating (1.2, 0) gained 0.65 point flat, "
                "nothing at the node level and lost 2.1 with overlap; see docs/wide-area.md's sweep")


# The largest tau the project measured for accuracy: the tau sweep (docs/paper.md, Appendix A; tools/paper/grid.py)
# ran tau in {1, 10, 25, 50, 100, 200}, and by 200 accuracy already falls with tau. The cost model has no
# accuracy term: a tau beyond this one is an answer about time alone, at an accuracy nobody measured.
MEASURED_TAU_MAX = 200


def beyond_measured(tau: int) -> str | None:
    """``'5.4x beyond the largest tau measured for accuracy (200, ...)'`` for a tau above
    ``MEASURED_TAU_MAX``, None for one within it."""
    if tau <= MEASURED_TAU_MAX:
        return None
    return (f"{tau / MEASURED_TAU_MAX:.1f}x beyond the largest tau measured for accuracy ({MEASURED_TAU_MAX}, "
            "where accuracy already falls)")
