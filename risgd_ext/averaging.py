"""Averaging of model state across ranks: one all_reduce per bucket, no packing copies.

At start the parameters (and floating-point buffers such as BatchNorm statistics) are re-pointed
into one flat buffer per dtype, as DeepSpeed's and Apex's flat master weights do. A round is then
``all_reduce`` of bucket-sized slices of that buffer, in place, and one division by the number of
live ranks: every rank divides the same reduced values, so all ranks end bit-identical. Optimizer
state (optional) is created lazily by the optimizer, so it is packed into its own flat buffer.

The model divergence ``mean_j ||x_j - x̄||² / ||x̄||²`` rides in the same collective. The anchor ``a``
is the previous average, bit-identical on every rank (the parameters DeepSpeed broadcast at start,
then each round's result). With the divergence measured, each rank reduces its displacement
``d_j = x_j - a`` (formed in place) instead of ``x_j``, and one extra float, a slot at the end of the
first flat buffer, carries ``||d_j||²``. The reduced buffer then holds everything the measurement
needs, and the average itself:

    S = sum_j d_j,   x̄ = a + S/n,   slot = sum_j ||d_j||²
    mean_j ||x_j - x̄||² = slot/n - ||S/n||²

so a round makes these passes over the parameters: ``x -= a`` and its dot product before the
collective; the division by n (which every round makes), a dot product, ``x̄ = a + S/n``, another
dot product and the copy ``a <- x̄`` after it. The dot products read data the previous pass left in
cache, and nothing is read back to the host until one conversion of three scalars at the end
(measuring ``||x - a||`` and ``||x̄ - a||`` as two distances, slow two-input reductions on a CPU,
with four readbacks, took twice as long). Every rank runs the same elementwise operations on the
same reduced values and the same anchor, so ranks still end bit-identical; summing displacements,
which are small, also loses less precision than summing the parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .topology import Topology, part


@dataclass
class RoundResult:
    bytes_reduced: int
    comm_seconds: float
    divergence: float


@dataclass
class _Flat:
    buffer: torch.Tensor      # [params | buffers | (slot)] of one dtype and device
    num_param_elems: int      # the parameter prefix, over which divergence is measured

    @property
    def params(self) -> torch.Tensor:
        return self.buffer[: self.num_param_elems]


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides pack its elements into one block without gaps or overlaps (any
    permutation of dimensions: contiguous, channels_last, ...)."""
    expected = 1
    dims = sorted(((st, sz) for sz, st in zip(t.size(), t.stride()) if sz != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _flatten_into(tensors: list[torch.Tensor], extra: int) -> torch.Tensor:
    """A flat buffer holding ``tensors``, which become views into it (their values are kept). Each
    keeps its strides (a channels_last weight stays channels_last: a convolution would otherwise
    convert it, and its gradient, on every step); a tensor that is not dense becomes contiguous."""
    flat = torch.zeros(sum(t.numel() for t in tensors) + extra, dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t in tensors:
        if is_dense(t):
            view = torch.as_strided(flat, t.size(), t.stride(), offset)
        else:
            view = flat[offset:offset + t.numel()].view_as(t)
        view.copy_(t.detach())
        t.data = view
        offset += t.numel()
    return flat


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||²`` as a 0-d tensor on x's device (no host synchronisation)."""
    if x.dtype in (torch.float32, torch.float64):
        return torch.dot(x, x)
    return torch.linalg.vector_norm(x, dtype=torch.float32).square()


def _slices(buf: torch.Tensor, bucket_bytes: int) -> list[torch.Tensor]:
    step = max(1, bucket_bytes // buf.element_size())
    return [buf[i:i + step] for i in range(0, buf.numel(), step)]


class BucketAverager:
    """Averages ``params`` and ``buffers`` (and, per call, extra tensors) over a process group.

    ``params`` must be identical on every rank when the averager is built (DeepSpeed broadcasts
    them at initialisation): they are the first anchor.

    With a :class:`Topology` (the node level) a round is hierarchical: optionally the node's ranks
    sum their buffers on the intra-node link (``node_sum``: needed when they differ), then rank l of
    every node all-reduces slice l in its cross group (the only traffic between nodes), then each
    slice is broadcast inside the node from the rank that reduced it.

    With overlap (:meth:`send`, :meth:`wait`, :meth:`apply`) the round's displacements are reduced
    in a buffer of their own while the model goes on training; see :class:`Pending`.
    """

    def __init__(self, params: list[torch.Tensor], buffers: list[torch.Tensor], bucket_bytes: int,
                 group: dist.ProcessGroup | None = None, synchronize=None, measure_divergence: bool = True,
                 topology: Topology | None = None):
        self.bucket_bytes = bucket_bytes
        self.measure_divergence = measure_divergence
        self.group = group
        self.topology = topology
        self._synchronize = synchronize or (lambda: None)
        self.flats: list[_Flat] = []
        kinds = list(dict.fromkeys((t.dtype, t.device) for t in params + buffers))
        for i, kind in enumerate(kinds):
            ps = [p for p in params if (p.dtype, p.device) == kind]
            bs = [b for b in buffers if (b.dtype, b.device) == kind]
            slot = 1 if i == 0 else 0
            self.flats.append(_Flat(_flatten_into(ps + bs, slot), sum(p.numel() for p in ps)))
        self.anchors = [f.params.clone() for f in self.flats]
        self._slot = self.flats[0].buffer[-1:]
        self._flat_buckets = [s for f in self.flats for s in _slices(f.buffer, bucket_bytes)]
        self._packed: torch.Tensor | None = None
        self.pending: Pending | None = None
        self._spare: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # overlap's buffers, reused
        self.intra_bytes = 0        # payload of intra-node collectives, since the last call of take_intra()
        self.intra_seconds = 0.0
        self.intra_collectives = 0
        self.inter_collectives = 0

    def set_anchor(self) -> None:
        """Take the current (rank-identical) parameters as the divergence reference."""
        for anchor, flat in zip(self.anchors, self.flats):
            anchor.copy_(flat.params)

    def _pack(self, extras: list[torch.Tensor], live: bool) -> None:
        total = sum(t.numel() for t in extras)
        if self._packed is None or self._packed.numel() != total:
            self._packed = torch.empty(total, dtype=extras[0].dtype, device=extras[0].device)
        if live:
            torch.cat([t.detach().flatten() for t in extras], out=self._packed)
        else:
            self._packed.zero_()

    # -- the collectives of one round ------------------------------------------------------------
    def _node_sum(self, bufs: list[torch.Tensor]) -> None:
        """Sum ``bufs`` over the node's ranks (intra-node link), blocking."""
        topo = self.topology
        t0 = time.perf_counter()
        for buf in bufs:
            for bucket in _slices(buf, self.bucket_bytes):
                dist.all_reduce(bucket, group=topo.node_group)
                self.intra_collectives += 1
        self._synchronize()
        self.intra_seconds += time.perf_counter() - t0
        self.intra_bytes += sum(b.numel() * b.element_size() for b in bufs)

    def _node_mean_buffers(self, bufs: list[torch.Tensor]) -> None:
        """Synchronous node: its ranks hold the same parameters but each its own BatchNorm
        statistics; make those the node's mean (the fast link) before one rank per slice crosses."""
        topo = self.topology
        segments = [b[f.num_param_elems: f.buffer.numel() - (1 if i == 0 else 0)]
                    for i, (b, f) in enumerate(zip(bufs, self.flats))]
        segments = [s for s in segments if s.numel()]
        if not segments:
            return
        self._node_sum(segments)
        for s in segments:
            s.div_(topo.node_size)

    def _within_node(self, bufs: list[torch.Tensor], node_sum: bool) -> None:
        """A hierarchical round's first phase: sum everything inside the node (its ranks differ), or
        only bring the BatchNorm statistics to the node's mean (a synchronous node)."""
        if node_sum:
            self._node_sum(bufs)
        else:
            self._node_mean_buffers(bufs)

    def _cross(self, bufs: list[torch.Tensor], async_op: bool) -> list:
        """All-reduce ``bufs`` between nodes (flat: between ranks); returns the works if ``async_op``."""
        topo = self.topology
        if topo is None:
            group, pieces = self.group, bufs
        else:
            group, pieces = topo.cross_group, [part(b, topo.local, topo.node_size) for b in bufs]
        works = []
        for piece in pieces:
            for bucket in _slices(piece, self.bucket_bytes) if piece.numel() else ():
                works.append(dist.all_reduce(bucket, group=group, async_op=async_op))
                self.inter_collectives += 1
        return works

    def _spread(self, bufs: list[torch.Tensor]) -> None:
        """Hierarchical: every rank broadcasts the slice it reduced to the rest of its node, blocking."""
        topo = self.topology
        if topo is None or topo.node_size == 1:
            return
        t0 = time.perf_counter()
        for buf in bufs:
            for j, src in enumerate(topo.node_ranks):
                piece = part(buf, j, topo.node_size)
                if piece.numel():
                    dist.broadcast(piece, src=src, group=topo.node_group)
                    self.intra_collectives += 1
                    if j != topo.local:
                        self.intra_bytes += piece.numel() * piece.element_size()
        self._synchronize()
        self.intra_seconds += time.perf_counter() - t0

    def _reduce(self, bufs: list[torch.Tensor], node_sum: bool) -> float:
        """The round's sum over all ranks of ``bufs``, in place, blocking; returns the seconds of
        the collectives between nodes."""
        self._synchronize()
        if self.topology is None:  # flat: one all_reduce per bucket (the model's kept precomputed)
            buckets = self._flat_buckets + [s for b in bufs[len(self.flats):] for s in _slices(b, self.bucket_bytes)]
            t0 = time.perf_counter()
            for bucket in buckets:
                dist.all_reduce(bucket, group=self.group)
            self.inter_collectives += len(buckets)
            self._synchronize()
            return time.perf_counter() - t0
        self._within_node(bufs, node_sum)
        t0 = time.perf_counter()
        self._cross(bufs, async_op=False)
        self._synchronize()
        comm = time.perf_counter() - t0
        self._spread(bufs)
        return comm

    def round_bytes(self, bufs: list[torch.Tensor]) -> int:
        """Payload of one round's reduction between nodes, per node (flat: per rank)."""
        return sum(b.numel() * b.element_size() for b in bufs)

    # -- a blocking round ------------------------------------------------------------------------
    @torch.no_grad()
    def average(self, live: bool, num_live: int, extras: list[torch.Tensor] | None = None,
                node_sum: bool = False) -> RoundResult:
        """Replace every tensor by its mean over live ranks; return bytes, seconds and divergence.

        ``num_live`` counts the contributions the sum holds: live ranks, or with a topology and no
        ``node_sum`` live nodes (whose ranks are identical and contribute once, through the cross
        group)."""
        extras = extras or []
        bufs = [f.buffer for f in self.flats]
        if extras:
            self._pack(extras, live)
            bufs = bufs + [self._packed]
        measure = self.measure_divergence
        if not live:
            for f in self.flats:
                f.buffer.zero_()  # a failed rank contributes weight 0 and takes the average
        elif measure:
            self._displace()
        else:
            self._slot.zero_()

        # Device work queued so far is the round's own, not communication: wait for it first, then
        # time the collectives as a whole (one synchronize before and one after, not per bucket).
        comm = self._reduce(bufs, node_sum)
        nbytes = self.round_bytes(bufs)

        if extras:
            self._packed.div_(num_live)
            offset = 0
            for t in extras:
                t.copy_(self._packed[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        if not measure:
            for f in self.flats:
                f.buffer.div_(num_live)
            return RoundResult(nbytes, comm, float("nan"))
        return RoundResult(nbytes, comm, self._finish([f.buffer for f in self.flats], num_live, self.flats))

    def _displace(self, out: list[torch.Tensor] | None = None) -> None:
        """``d = x - a`` over the parameters (in place, or into ``out``) and ``||d||²`` into the slot."""
        my_sq = None
        for i, (f, a) in enumerate(zip(self.flats, self.anchors)):
            if f.num_param_elems:
                if out is None:
                    d = f.params.sub_(a)  # the displacement from the last average, in place
                else:
                    d = torch.sub(f.params, a, out=out[i][: f.num_param_elems])
                sq = _sq_norm(d).to(self._slot.dtype)
                my_sq = sq if my_sq is None else my_sq + sq.to(my_sq.device)
        slot = self._slot if out is None else out[0][-1:]
        if my_sq is None:
            slot.zero_()
        else:
            slot.copy_(my_sq)

    def _finish(self, sums: list[torch.Tensor], num_live: int, flats: list[_Flat]) -> float:
        """From the reduced sums (``S = sum_j d_j`` over the parameters, sums of buffers, the slot):
        the mean, in place (``x̄ = a + S/n``; buffers: their mean), the anchor update, and the
        divergence. ``sums[i]`` is laid out as ``flats[i].buffer``."""
        drift, norms = [], []
        for buf, f, a in zip(sums, flats, self.anchors):
            buf.div_(num_live)  # params: S/n = x̄ - a; buffers and the slot: the mean
            if not f.num_param_elems:
                continue
            mean_d = buf[: f.num_param_elems]
            drift.append(_sq_norm(mean_d))  # ||x̄ - a||²
            mean_d.add_(a)  # x̄ = a + S/n: the same correctly rounded operations on every rank
            norms.append(_sq_norm(mean_d))
            a.copy_(mean_d)
        scalars = [sums[0][-1], *drift, *norms]
        dev = scalars[0].device
        values = torch.stack([s.to(device=dev, dtype=torch.float64) for s in scalars]).tolist()  # one readback
        mean_sq, k = values[0], len(drift)  # mean_j ||x_j - a||²
        drift_sq, norm = sum(values[1:1 + k]), sum(values[1 + k:])
        # mean_j ||x_j - x̄||² = mean_j ||x_j - a||² - ||x̄ - a||²  (clamped: rounding can dip below 0)
        spread = max(mean_sq - drift_sq, 0.0)
        return spread / norm if norm > 0 else 0.0

    # -- inside a node ---------------------------------------------------------------------------
    @torch.no_grad()
    def average_within_node(self) -> None:
        """Average parameters and buffers over the node's ranks only (the intra-node link)."""
        topo = self.topology
        bufs = [f.buffer for f in self.flats]
        self._synchronize()
        self._node_sum(bufs)
        for f in self.flats:
            f.buffer.div_(topo.node_size)

    # -- an overlapped round ---------------------------------------------------------------------
    @torch.no_grad()
    def send(self, live: bool, num_live: int, node_sum: bool, apply_step: int) -> None:
        """Start a round in the background: the displacements ``d = x - a`` (and the buffers) are
        copied into a buffer of their own and all-reduced asynchronously; the model trains on."""
        if self.pending is not None:
            raise RuntimeError("a round is still pending: apply it before starting the next")
        p = Pending(apply_step=apply_step, num_live=num_live)
        spare, self._spare = self._spare, None  # the last round's two buffers, reused
        if spare is None:
            spare = ([torch.empty_like(f.buffer) for f in self.flats], [torch.empty_like(f.buffer) for f in self.flats])
        p.sent, p.sums = spare
        for sent, f in zip(p.sent, self.flats):
            sent.copy_(f.buffer)  # x at the send, buffers included
        if not live:
            for s in p.sums:
                s.zero_()
        else:
            for s, f in zip(p.sums, self.flats):
                s[f.num_param_elems:].copy_(f.buffer[f.num_param_elems:])  # buffers (and slot) as they are
            if self.measure_divergence:
                self._displace(out=p.sums)
            else:
                for s, f, a in zip(p.sums, self.flats, self.anchors):
                    torch.sub(f.params, a, out=s[: f.num_param_elems])
                p.sums[0][-1:].zero_()
        p.nbytes = self.round_bytes(p.sums)
        if self.topology is not None:  # the fast link, blocking: only the slow part is overlapped
            self._within_node(p.sums, node_sum)
        self._synchronize()
        p.started = time.perf_counter()
        p.works = self._cross(p.sums, async_op=True)
        for work in p.works:
            work.get_future().then(p.completed)
        self.pending = p

    def wait(self) -> float:
        """Block until the pending round's sums are complete on this rank; returns the seconds waited."""
        p = self.pending
        if p is None or p.complete:
            return 0.0
        t0 = time.perf_counter()
        for work in p.works:
            work.wait()
        self._synchronize()
        waited = time.perf_counter() - t0
        done = max(p.done_at) if p.done_at else time.perf_counter()
        p.comm_seconds = max(done - p.started, 0.0)
        p.works = []
        self._spread(p.sums)
        p.complete = True
        return waited

    @torch.no_grad()
    def average_view(self) -> list[torch.Tensor]:
        """The pending round's averaged model (flat buffers), computed as :meth:`apply` will, without
        changing any state; call :meth:`wait` first."""
        p = self.pending
        out = []
        for s, f, a in zip(p.sums, self.flats, self.anchors):
            v = torch.div(s, p.num_live)
            if f.num_param_elems:
                v[: f.num_param_elems].add_(a)
            out.append(v)
        return out

    @torch.no_grad()
    def apply(self) -> RoundResult:
        """Apply the pending round (:meth:`wait` first): ``x <- x̄ + (x - x_sent)``, the average plus
        this rank's progress since the send. With no step taken since, ``x - x_sent`` is exactly 0
        and every rank ends bit-identical at ``x̄``."""
        p = self.pending
        if not p.complete:
            raise RuntimeError("apply() before wait()")
        if self.measure_divergence:
            divergence = self._finish(p.sums, p.num_live, self.flats)
        else:
            for s, f, a in zip(p.sums, self.flats, self.anchors):
                s.div_(p.num_live)
                s[: f.num_param_elems].add_(a)
                a.copy_(s[: f.num_param_elems])
            divergence = float("nan")
        for s, sent, f in zip(p.sums, p.sent, self.flats):
            torch.sub(f.buffer, sent, out=sent)   # this rank's progress since the send
            torch.add(s, sent, out=f.buffer)      # x̄ + progress
        self._slot.zero_()
        self.pending = None
        self._spare = (p.sent, p.sums)
        return RoundResult(p.nbytes, p.comm_seconds, divergence)

    def pending_state(self) -> dict | None:
        """The pending round, complete (waits for it), for a checkpoint."""
        p = self.pending
        if p is None:
            return None
        self.wait()
        return {"apply_step": p.apply_step, "num_live": p.num_live, "nbytes": p.nbytes,
                "comm_seconds": p.comm_seconds, "sent": [t.detach().cpu() for t in p.sent],
                "sums": [t.detach().cpu() for t in p.sums]}

    def load_pending_state(self, state: dict | None) -> None:
        self.pending = None
        if state is None:
            return
        p = Pending(apply_step=state["apply_step"], num_live=state["num_live"], complete=True)
        p.nbytes, p.comm_seconds = state["nbytes"], state["comm_seconds"]
        p.sent = [t.to(f.buffer.device) for t, f in zip(state["sent"], self.flats)]
        p.sums = [t.to(f.buffer.device) for t, f in zip(state["sums"], self.flats)]
        self.pending = p


@dataclass
class Pending:
    """A round whose all-reduce runs in the background (overlap).

    ``sent`` is the model when the round started, ``sums`` the buffer being reduced: the
    displacements ``x_j - a`` (and buffers, and the divergence slot) summed over ranks once
    complete. The average is applied at optimizer step ``apply_step``: a pure function of the
    schedule, never of when the network finished, so the trajectory does not depend on the link.
    """

    apply_step: int
    num_live: int
    complete: bool = False
    nbytes: int = 0
    comm_seconds: float = 0.0
    started: float = 0.0
    sent: list = field(default_factory=list)
    sums: list = field(default_factory=list)
    works: list = field(default_factory=list)
    done_at: list = field(default_factory=list)

    def completed(self, fut):
        self.done_at.append(time.perf_counter())  # on the communication thread, when a bucket is done
        return None


class GradientAverager:
    """All-reduce (mean) of the gradients over a group: a node's ranks, every local step.

    The gradients are packed into one persistent flat buffer, reduced bucket by bucket and copied
    back: every rank of the group then holds the same bits and takes the same optimizer step.
    """

    def __init__(self, params: list[torch.Tensor], group: dist.ProcessGroup, size: int, bucket_bytes: int,
                 synchronize=None):
        self.params, self.group, self.size = params, group, size
        self._synchronize = synchronize or (lambda: None)
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.buckets = _slices(self.flat, bucket_bytes)

    @torch.no_grad()
    def reduce(self) -> tuple[int, int]:
        """Average the gradients in place; returns (payload bytes, collectives)."""
        offset = 0
        for p in self.params:
            view = self.flat[offset:offset + p.numel()]
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad.reshape(-1))
            offset += p.numel()
        self._synchronize()
        for bucket in self.buckets:
            dist.all_reduce(bucket, group=self.group)
        self.flat.div_(self.size)
        offset = 0
        for p in self.params:
            view = self.flat[offset:offset + p.numel()].view(p.shape)
            if p.grad is None:
                p.grad = view.clone(memory_format=torch.preserve_format)
            else:
                p.grad.copy_(view)
            offset += p.numel()
        return self.flat.numel() * self.flat.element_size(), len(self.buckets)
