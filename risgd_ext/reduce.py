"""The collectives of a round: how buffers laid out as the flat model are summed over the ranks.

Flat (no node level): one ``all_reduce`` per bucket-sized slice, in place, over the data-parallel
group. With the node level a sum is hierarchical: optionally the node's ranks sum their buffers on
the intra-node link (``node_sum``: needed when they differ; a synchronous node only brings its
BatchNorm statistics to the node's mean), then rank l of every node all-reduces slice l in its
cross group (the only traffic between nodes), then each slice is broadcast inside the node from
the rank that reduced it. Every call records what it did in the :class:`Traffic` it is given.

Also here: :class:`GradientAverager`, a node's per-step gradient all-reduce (``tau_intra: 0``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .codec import Codec
from .flat import FlatModel
from .topology import NodeGroups, part


@dataclass
class Traffic:
    """What the collectives of one round (or one intra-node average) did on this rank."""

    intra_bytes: int = 0          # payload of intra-node collectives
    intra_seconds: float = 0.0
    intra_collectives: int = 0
    inter_collectives: int = 0    # collectives between nodes (flat: between ranks)


def slices(buf: torch.Tensor, bucket_bytes: int) -> list[torch.Tensor]:
    step = max(1, bucket_bytes // buf.element_size())
    return [buf[i:i + step] for i in range(0, buf.numel(), step)]


def tensor_bytes(bufs: list[torch.Tensor]) -> int:
    """The bytes of ``bufs`` as they are (an uncompressed sum's payload between nodes, per node)."""
    return sum(b.numel() * b.element_size() for b in bufs)


class Reducer:
    """Sums of buffers laid out as ``model``'s flat buffers (plus, flat only, extra buffers)."""

    def __init__(self, model: FlatModel, bucket_bytes: int, group: dist.ProcessGroup | None = None,
                 nodes: NodeGroups | None = None, synchronize=None, codec: Codec | None = None,
                 error_feedback: bool = False):
        self.model, self.bucket_bytes, self.group, self.nodes = model, bucket_bytes, group, nodes
        self.synchronize = synchronize or (lambda: None)
        self.codec, self.error_feedback = codec, error_feedback and codec is not None
        self.residual: list[torch.Tensor] | None = None  # error feedback: what compression dropped, per rank

    def round_bytes(self, bufs: list[torch.Tensor]) -> int:
        """Bytes one sum sends between nodes, per node (flat: per rank): fp32, or the compressed
        parameter displacement (scales included) plus the fp32 buffers and slot."""
        if self.codec is None:
            return tensor_bytes(bufs)
        total = 0
        for local in range(self.nodes.layout.node_size if self.nodes is not None else 1):
            for i, buf in enumerate(bufs):
                head, tail, _ = self._split(buf, i, local)
                total += sum(self.codec.nbytes(b.numel()) for b in slices(head, self.bucket_bytes))
                total += tail.numel() * tail.element_size()
        return total

    def _split(self, buf: torch.Tensor, i: int, local: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's cross-node piece of ``buf`` as (the parameter part, the rest, its offset)."""
        k = self.nodes.layout.node_size if self.nodes is not None else 1
        piece = part(buf, local, k)
        offset = buf.numel() * local // k
        params = self.model.flats[i].num_param_elems if i < len(self.model.flats) else 0
        cut = min(max(params - offset, 0), piece.numel())
        return piece[:cut], piece[cut:], offset

    def _residual(self, i: int, start: int, n: int) -> torch.Tensor:
        if self.residual is None:
            self.residual = [torch.zeros_like(f.buffer) for f in self.model.flats]
        return self.residual[i][start:start + n]

    # -- inside a node ---------------------------------------------------------------------------
    def _node_sum(self, bufs: list[torch.Tensor], traffic: Traffic) -> None:
        """Sum ``bufs`` over the node's ranks (intra-node link), blocking."""
        t0 = time.perf_counter()
        for buf in bufs:
            for bucket in slices(buf, self.bucket_bytes):
                dist.all_reduce(bucket, group=self.nodes.node_group)
                traffic.intra_collectives += 1
        self.synchronize()
        traffic.intra_seconds += time.perf_counter() - t0
        traffic.intra_bytes += tensor_bytes(bufs)

    def _node_mean_buffers(self, bufs: list[torch.Tensor], traffic: Traffic) -> None:
        """Synchronous node: its ranks hold the same parameters but each its own BatchNorm
        statistics; make those the node's mean (the fast link) before one rank per slice crosses."""
        segments = [b[f.num_param_elems: f.buffer.numel() - (1 if i == 0 else 0)]
                    for i, (b, f) in enumerate(zip(bufs, self.model.flats))]
        segments = [s for s in segments if s.numel()]
        if not segments:
            return
        self._node_sum(segments, traffic)
        for s in segments:
            s.div_(self.nodes.layout.node_size)

    def _within_node(self, bufs: list[torch.Tensor], node_sum: bool, traffic: Traffic) -> None:
        """A hierarchical sum's first phase: sum everything inside the node (its ranks differ), or
        only bring the BatchNorm statistics to the node's mean (a synchronous node)."""
        if node_sum:
            self._node_sum(bufs, traffic)
        else:
            self._node_mean_buffers(bufs, traffic)

    def node_mean(self, traffic: Traffic) -> None:
        """Average the model's own buffers over the node's ranks only (the intra-node link)."""
        bufs = self.model.buffers
        self.synchronize()
        self._node_sum(bufs, traffic)
        for b in bufs:
            b.div_(self.nodes.layout.node_size)

    # -- across nodes ----------------------------------------------------------------------------
    def _cross(self, bufs: list[torch.Tensor], async_op: bool, traffic: Traffic, live_here: bool = True) -> list:
        """All-reduce ``bufs`` between nodes (flat: between ranks); returns the works if ``async_op``."""
        nodes = self.nodes
        if self.codec is not None:
            return self._cross_compressed(bufs, async_op, traffic, live_here)
        if nodes is None:
            group, pieces = self.group, bufs
        else:
            k = nodes.layout.node_size
            group, pieces = nodes.cross_group, [part(b, nodes.local, k) for b in bufs]
        works = []
        for piece in pieces:
            for bucket in slices(piece, self.bucket_bytes) if piece.numel() else ():
                works.append(dist.all_reduce(bucket, group=group, async_op=async_op))
                traffic.inter_collectives += 1
        return works

    def _cross_compressed(self, bufs: list[torch.Tensor], async_op: bool, traffic: Traffic, live_here: bool) -> list:
        """The parameter displacement encoded bucket by bucket (with error feedback: plus the
        residual, which keeps what the encoding dropped) and all-gathered; the fp32 rest (buffers,
        slot) all-reduced. Returns works whose ``wait()`` also decodes and sums, in rank order."""
        group = self.nodes.cross_group if self.nodes is not None else self.group
        size = dist.get_world_size(group)
        local = self.nodes.local if self.nodes is not None else 0
        step = max(1, self.bucket_bytes // 4)
        works = []
        for i, buf in enumerate(bufs):
            head, tail, offset = self._split(buf, i, local)
            for j, bucket in enumerate(slices(head, self.bucket_bytes)):
                x = bucket
                if self.error_feedback and live_here:
                    residual = self._residual(i, offset + j * step, bucket.numel())
                    x = bucket + residual
                payload = self.codec.encode(x)
                if self.error_feedback and live_here:
                    torch.sub(x, self.codec.decode(payload, x.numel()), out=residual)
                gathered = [torch.empty_like(payload) for _ in range(size)]
                work = _Gathered(dist.all_gather(gathered, payload, group=group, async_op=async_op), gathered,
                                 bucket, self.codec)
                if not async_op:
                    work.wait()
                works.append(work)
                traffic.inter_collectives += 1
            for bucket in slices(tail, self.bucket_bytes) if tail.numel() else ():
                works.append(dist.all_reduce(bucket, group=group, async_op=async_op))
                traffic.inter_collectives += 1
        return works

    def spread(self, bufs: list[torch.Tensor], traffic: Traffic) -> None:
        """Hierarchical: every rank broadcasts the slice it reduced to the rest of its node, blocking."""
        nodes = self.nodes
        if nodes is None or nodes.layout.node_size == 1:
            return
        k = nodes.layout.node_size
        t0 = time.perf_counter()
        for buf in bufs:
            for j, src in enumerate(nodes.node_ranks):
                piece = part(buf, j, k)
                if piece.numel():
                    dist.broadcast(piece, src=src, group=nodes.node_group)
                    traffic.intra_collectives += 1
                    if j != nodes.local:
                        traffic.intra_bytes += piece.numel() * piece.element_size()
        self.synchronize()
        traffic.intra_seconds += time.perf_counter() - t0

    # -- a whole sum -----------------------------------------------------------------------------
    def sum(self, bufs: list[torch.Tensor], node_sum: bool, traffic: Traffic, live_here: bool = True) -> float:
        """The sum over all ranks of ``bufs``, in place, blocking; returns the seconds of the
        collectives between nodes. Device work queued so far is the round's own, not
        communication: it is waited for first, and the collectives are timed as a whole (one
        synchronize before and one after, not per bucket)."""
        self.synchronize()
        if self.nodes is None and self.codec is None:  # flat: one all_reduce per bucket
            buckets = [s for b in bufs for s in slices(b, self.bucket_bytes)]
            t0 = time.perf_counter()
            for bucket in buckets:
                dist.all_reduce(bucket, group=self.group)
            traffic.inter_collectives += len(buckets)
            self.synchronize()
            return time.perf_counter() - t0
        if self.nodes is not None:
            self._within_node(bufs, node_sum, traffic)
        t0 = time.perf_counter()
        self._cross(bufs, async_op=False, traffic=traffic, live_here=live_here)
        self.synchronize()
        comm = time.perf_counter() - t0
        self.spread(bufs, traffic)
        return comm

    def start(self, bufs: list[torch.Tensor], node_sum: bool, traffic: Traffic,
              live_here: bool = True) -> tuple[float, list]:
        """Start the sum in the background: the intra-node phase blocks (the fast link: only the
        slow part is overlapped), the cross-node all-reduces are launched. Returns the clock at
        their launch and their works; :meth:`wait` for them, then :meth:`spread`."""
        if self.nodes is not None:
            self._within_node(bufs, node_sum, traffic)
        self.synchronize()
        started = time.perf_counter()
        return started, self._cross(bufs, async_op=True, traffic=traffic, live_here=live_here)

    def wait(self, works: list) -> None:
        """Block until :meth:`start`'s works are done on this rank (and the device with them)."""
        for work in works:
            work.wait()
        self.synchronize()


class _Gathered:
    """An all_gather of encoded payloads; ``wait()`` completes it and writes the decoded sum, in
    rank order (the same fp32 additions on every rank), into the bucket."""

    def __init__(self, work, gathered: list[torch.Tensor], bucket: torch.Tensor, codec: Codec):
        self.work, self.gathered, self.bucket, self.codec = work, gathered, bucket, codec
        self.done = False

    def get_future(self):
        return self.work.get_future()

    def wait(self) -> None:
        if self.done:
            return
        if self.work is not None:
            self.work.wait()
        n = self.bucket.numel()
        self.bucket.copy_(self.codec.decode(self.gathered[0], n))
        for payload in self.gathered[1:]:
            self.bucket.add_(self.codec.decode(payload, n))
        self.gathered, self.done = [], True


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
        self.buckets = slices(self.flat, bucket_bytes)

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
