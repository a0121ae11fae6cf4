"""The collectives of a round: how buffers laid out as the flat model are summed over the ranks.

Flat (no node level): one ``all_reduce`` per bucket-sized slice, in place, over the data-parallel
group. Compressed (``compress`` other than none): each bucket of the parameter displacement is summed
by the two-phase compressed all-reduce of :mod:`risgd_ext.codec` (all_to_all of encoded chunks to
their owners, fp32 sums there, one re-encoding, all_gather), with two residuals of error feedback:
each rank's (what encoding its own chunks dropped) and each chunk owner's (what re-encoding the sum
dropped); the fp32 rest (buffers, slot) is all-reduced.

With the node level a sum is hierarchical: optionally the node's ranks sum their buffers on the
intra-node link (``node_sum``: needed when they differ; a synchronous node only brings its
BatchNorm statistics to the node's mean), then rank l of every node all-reduces slice l in its
cross group (the only traffic between nodes), then each slice is broadcast inside the node from
the rank that reduced it. Every call records what it did in the :class:`Traffic` it is given.

Also here: :class:`GradientAverager`, a node's per-step gradient all-reduce (``tau_intra: 0``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .codec import Codec, chunk_len, two_phase_payload
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
        # the collectives between nodes (flat: between ranks): a torch.distributed group, or a
        # fault-tolerant run's live cross-node group (risgd_ext.live.LiveNodes), set per run
        self.cross: GroupOps | Any = GroupOps(nodes.cross_group if nodes is not None else group)
        self.synchronize = synchronize or (lambda: None)
        self.codec, self.error_feedback = codec, error_feedback and codec is not None
        self.residual: list[torch.Tensor] | None = None  # error feedback: what compression dropped, per rank
        # error feedback's second level: what re-encoding the sum of each chunk this rank owns dropped,
        # by (flat buffer, bucket); kept with the group's size and this rank's place in it (an owner's
        # chunk is another after the group changes: then it starts again from zero)
        self.server_residual: dict[tuple[int, int], torch.Tensor] = {}
        self.server_owner: tuple[int, int] | None = None

    def round_bytes(self, bufs: list[torch.Tensor]) -> int:
        """Bytes one sum sends between nodes, per node (flat: per rank), counted as the payload of an
        all_reduce (a ring moves 2(N-1)/N of it per rank): fp32, or the compressed parameter
        displacement as the two-phase round counts it (N chunk payloads, scales and padding included)
        plus the fp32 buffers and slot."""
        if self.codec is None:
            return tensor_bytes(bufs)
        ranks = self._cross_size()
        total = 0
        for local in range(self.nodes.layout.node_size if self.nodes is not None else 1):
            for i, buf in enumerate(bufs):
                head, tail, _ = self._split(buf, i, local)
                total += sum(two_phase_payload(self.codec, b.numel(), ranks) for b in slices(head, self.bucket_bytes))
                total += tail.numel() * tail.element_size()
        return total

    def _cross_size(self) -> int:
        return self.cross.size

    def server_state(self) -> dict | None:
        """The owners' residuals for a checkpoint (None without any)."""
        if not self.server_residual:
            return None
        keys = sorted(self.server_residual)
        return {"owner": list(self.server_owner), "keys": [list(k) for k in keys],
                "values": [self.server_residual[k].detach().cpu() for k in keys]}

    def load_server_state(self, state: dict | None) -> None:
        self.server_residual, self.server_owner = {}, None
        if state:
            device = self.model.flats[0].buffer.device
            self.server_owner = tuple(state["owner"])
            self.server_residual = {tuple(k): v.to(device).clone() for k, v in zip(state["keys"], state["values"])}

    def save_residuals(self) -> tuple | None:
        """Both residuals as they are (a fault-tolerant round that fails puts them back)."""
        if self.codec is None or not self.error_feedback:
            return None
        mine = [r.clone() for r in self.residual] if self.residual is not None else None
        return mine, {k: v.clone() for k, v in self.server_residual.items()}, self.server_owner

    def restore_residuals(self, saved: tuple | None) -> None:
        if saved is not None:
            self.residual, self.server_residual, self.server_owner = saved

    def _server_residual(self, key: tuple[int, int], n: int, owner: tuple[int, int]) -> torch.Tensor:
        """The owner's residual of bucket ``key`` (n values): zeros at first, or after the group changed."""
        if self.server_owner != owner:
            self.server_residual, self.server_owner = {}, owner
        r = self.server_residual.get(key)
        if r is None or r.numel() != n:
            device = self.model.flats[0].buffer.device
            r = self.server_residual[key] = torch.zeros(n, dtype=torch.float32, device=device)
        return r

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
        pieces = bufs if nodes is None else [part(b, nodes.local, nodes.layout.node_size) for b in bufs]
        works = []
        for piece in pieces:
            for bucket in slices(piece, self.bucket_bytes) if piece.numel() else ():
                works.append(self.cross.all_reduce(bucket, async_op=async_op))
                traffic.inter_collectives += 1
        return works

    def _cross_compressed(self, bufs: list[torch.Tensor], async_op: bool, traffic: Traffic, live_here: bool) -> list:
        """The parameter displacement, bucket by bucket, through the two-phase compressed all-reduce (with
        error feedback: plus this rank's residual, which keeps what the encoding dropped); the fp32 rest
        (buffers, slot) all-reduced. Returns works whose ``wait()`` completes the sum in the bucket:
        overlapped, the first phase (to the owners) runs in the background, the second at ``wait()``."""
        cross = self.cross
        size, me = cross.size, cross.rank
        local = self.nodes.local if self.nodes is not None else 0
        step = max(1, self.bucket_bytes // 4)
        codec = self.codec
        works = []
        for i, buf in enumerate(bufs):
            head, tail, offset = self._split(buf, i, local)
            for j, bucket in enumerate(slices(head, self.bucket_bytes)):
                n = bucket.numel()
                c = chunk_len(codec, n, size)
                x = torch.zeros(size * c, dtype=torch.float32, device=bucket.device)
                x[:n] = bucket
                ef = self.error_feedback and live_here
                if ef:
                    residual = self._residual(i, offset + j * step, n)
                    x[:n] += residual
                if ef:  # what this rank's encoding dropped, kept for its next round
                    encoded = [codec.encode_lossy(x[k * c:(k + 1) * c]) for k in range(size)]
                    payloads = [p for p, _ in encoded]
                    torch.sub(x[:n], torch.cat([d for _, d in encoded])[:n], out=residual)
                else:
                    payloads = [codec.encode(x[k * c:(k + 1) * c]) for k in range(size)]
                send = torch.cat(payloads)
                recv = torch.empty_like(send)
                # launched in the background even for a blocking sum, whose second phases follow all the
                # first ones: the same order of operations either way (a fault-tolerant round can be
                # joined blocking by a node whose peers run it overlapped)
                work = cross.all_to_all_single(recv, send, async_op=True)
                owned = self._server_residual((i, j), c, (size, me)) if self.error_feedback else None
                works.append(_TwoPhase(work, recv, bucket, codec, c, size, cross, owned))
                traffic.inter_collectives += 2
            for bucket in slices(tail, self.bucket_bytes) if tail.numel() else ():
                works.append(cross.all_reduce(bucket, async_op=async_op))
                traffic.inter_collectives += 1
        if not async_op:
            for w in works:
                if isinstance(w, _TwoPhase):
                    w.wait()
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
                self.cross.all_reduce(bucket)
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


# torch 2.14 names it all_gather_single (all_gather_into_tensor, deprecated there, before)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class GroupOps:
    """The collectives between nodes over a torch.distributed group (a fixed run's cross group);
    :class:`risgd_ext.live.LiveNodes` has the same four, over torchft's group of the live nodes."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def all_reduce(self, t: torch.Tensor, async_op: bool = False):
        return dist.all_reduce(t, group=self.group, async_op=async_op)

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        return dist.all_to_all_single(out, inp, group=self.group, async_op=async_op)

    def all_gather_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        return _all_gather_single(out, inp, group=self.group, async_op=async_op)


class _TwoPhase:
    """One bucket's two-phase compressed all-reduce after its first phase was launched (the all_to_all
    that brought this rank the N payloads of the chunk it owns); ``wait()`` completes it: the owner's
    fp32 sum in rank order, plus its residual, encoded once; the all_gather of every owner's encoded
    sum; every rank decodes the same N payloads into the bucket (the same bits on every rank)."""

    def __init__(self, work, recv: torch.Tensor, bucket: torch.Tensor, codec: Codec, chunk: int, size: int,
                 cross, owned: torch.Tensor | None):
        self.work, self.recv, self.bucket, self.codec = work, recv, bucket, codec
        self.chunk, self.size, self.cross, self.owned = chunk, size, cross, owned
        self.done = False

    def get_future(self):
        return self.work.get_future()

    def wait(self) -> None:
        if self.done:
            return
        if self.work is not None:
            self.work.wait()
        codec, c = self.codec, self.chunk
        parts = self.recv.view(self.size, -1)
        total = codec.decode(parts[0], c).clone()
        for payload in parts[1:]:  # in rank order: the same fp32 additions on every owner
            total.add_(codec.decode(payload, c))
        if self.owned is not None:
            total.add_(self.owned)
        if self.owned is not None:  # what re-encoding the sum dropped, added to the next round's sum
            mine, sent = codec.encode_lossy(total)
            torch.sub(total, sent, out=self.owned)
        else:
            mine = codec.encode(total)
        gathered = torch.empty(self.size * mine.numel(), dtype=mine.dtype, device=mine.device)
        self.cross.all_gather_single(gathered, mine)
        n = self.bucket.numel()
        out = torch.cat([codec.decode(p, c) for p in gathered.view(self.size, -1)])
        self.bucket.copy_(out[:n])
        self.recv, self.done = None, True


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
