"""The collectives of a round: how buffers laid out as the flat model are summed over the ranks. One
strategy per run, chosen by ``Reducer(...)`` from its arguments:

- :class:`AllReduce` (fp32): one ``all_reduce`` per bucket-sized slice, in place;
- :class:`TwoPhase` (``compress`` other than none; its own part in :mod:`risgd_ext.twophase`): each
  bucket of the parameter displacement is summed by the two-phase compressed all-reduce of a
  :mod:`risgd_ext.codec` codec (all_to_all of encoded chunks to their owners, fp32 sums there, one
  re-encoding, all_gather), with two residuals of error feedback: each rank's (what encoding its own
  chunks dropped) and each chunk owner's (what re-encoding the sum dropped); the fp32 rest (buffers,
  slot, a counted round's count) rides in the last bucket's chunks, summed exactly by their owners.

A sum's life: :meth:`Reducer.launch` (the node's phase, then the cross-node collectives started),
:meth:`Pending.advance` (overlapped: what is ready started in the background), :meth:`Pending.finish`
(wait, then the node's spread).

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

from .codec import Codec
from .flat import SLOT, FlatModel
from .topology import NodeGroups, part, slices
from .twophase import TwoPhaseSum


@dataclass
class Traffic:
    """What the collectives of one round (or one intra-node average) did on this rank."""

    intra_bytes: int = 0          # payload of intra-node collectives
    intra_seconds: float = 0.0
    intra_collectives: int = 0
    inter_collectives: int = 0    # collectives between nodes (flat: between ranks)


def tensor_bytes(bufs: list[torch.Tensor]) -> int:
    """The bytes of ``bufs`` as they are (an uncompressed sum's payload between nodes, per node)."""
    return sum(b.numel() * b.element_size() for b in bufs)


class Reducer:
    """How a round's buffers (laid out as ``model``'s flat buffers, plus, flat only, extra buffers) are
    summed over the ranks: one strategy per run, chosen by :meth:`Reducer.__new__` from its arguments:

    - :class:`AllReduce`: fp32, one ``all_reduce`` per bucket (flat, or per node's slice at the node level);
    - :class:`TwoPhase`: the parameter displacement through the two-phase compressed all-reduce of a
      ``codec``, with two-level error feedback; the fp32 rest (buffers, slot) in the same chunks.

    The node level (``nodes``) wraps either: the sum inside the node first, then the cross-node sum of this
    rank's slice, then the slices broadcast inside the node. A sum's whole life is :meth:`launch` (the
    node's phase blocks; the cross-node collectives start, in the background or blocking) and
    :meth:`Pending.finish` (wait, then the node's spread); :meth:`sum` is both at once."""

    codec: Codec | None = None
    error_feedback = False

    def __new__(cls, model: FlatModel, bucket_bytes: int, group: dist.ProcessGroup | None = None,
                nodes: NodeGroups | None = None, synchronize=None, codec: Codec | None = None,
                error_feedback: bool = False):
        if cls is Reducer:  # the strategy of these arguments
            cls = AllReduce if codec is None else TwoPhase
        return super().__new__(cls)

    def __init__(self, model: FlatModel, bucket_bytes: int, group: dist.ProcessGroup | None = None,
                 nodes: NodeGroups | None = None, synchronize=None, codec: Codec | None = None,
                 error_feedback: bool = False):
        self.model, self.bucket_bytes, self.group, self.nodes = model, bucket_bytes, group, nodes
        # the collectives between nodes (flat: between ranks): a torch.distributed group, or a
        # fault-tolerant run's live cross-node group (risgd_ext.live.LiveNodes), set per run
        self.cross: GroupOps | Any = GroupOps(nodes.cross_group if nodes is not None else group)
        self.synchronize = synchronize or (lambda: None)
        self.residual: list[torch.Tensor] | None = None  # error feedback (TwoPhase): this rank's residuals

    # -- the strategy's own part: bytes and the cross-node sum -----------------------------------------
    def round_bytes(self, bufs: list[torch.Tensor]) -> int:
        """Bytes one sum sends between nodes, per node (flat: per rank), counted as the payload of an
        all_reduce (a ring moves 2(N-1)/N of it per rank)."""
        raise NotImplementedError

    def _cross(self, bufs: list[torch.Tensor], background: bool, traffic: Traffic, live_here: bool) -> list:
        """Sum this rank's cross-node pieces of ``bufs`` between nodes; returns the works (each with
        ``wait()`` and ``get_future()``), done at once unless ``background``."""
        raise NotImplementedError

    def _pieces(self, bufs: list[torch.Tensor]) -> list[torch.Tensor]:
        nodes = self.nodes
        return bufs if nodes is None else [part(b, nodes.local, nodes.layout.node_size) for b in bufs]

    # -- a whole sum -----------------------------------------------------------------------------------
    def launch(self, bufs: list[torch.Tensor], node_sum: bool, traffic: Traffic, live_here: bool = True,
               background: bool = False) -> Pending:
        """Start the sum over all ranks of ``bufs``, in place. Device work queued so far is the round's own,
        not communication: it is waited for first. The node's phase blocks (the fast link: only the slow
        part is overlapped); the cross-node collectives run in the background or, blocking, here."""
        self.synchronize()
        if self.nodes is not None:
            self._within_node(bufs, node_sum, traffic)
            self.synchronize()
        started = time.perf_counter()
        works = self._cross(bufs, background, traffic, live_here)
        return Pending(self, bufs, works, started, background)

    def sum(self, bufs: list[torch.Tensor], node_sum: bool, traffic: Traffic, live_here: bool = True) -> float:
        """The sum over all ranks of ``bufs``, in place, blocking; returns the seconds of the collectives
        between nodes (timed as a whole: one synchronize before and one after, not per bucket)."""
        return self.launch(bufs, node_sum, traffic, live_here).finish(traffic)[0]

    # -- inside a node ---------------------------------------------------------------------------------
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

    def _within_node(self, bufs: list[torch.Tensor], node_sum: bool, traffic: Traffic) -> None:
        """A hierarchical sum's first phase: sum everything inside the node (its ranks differ), or only
        bring the BatchNorm statistics to the node's mean (a synchronous node: its ranks hold the same
        parameters, each its own statistics) before one rank per slice crosses."""
        if node_sum:
            self._node_sum(bufs, traffic)
            return
        segments = [b[f.num_param_elems: f.buffer.numel() - (SLOT if i == 0 else 0)]
                    for i, (b, f) in enumerate(zip(bufs, self.model.flats))]
        segments = [s for s in segments if s.numel()]
        if segments:
            self._node_sum(segments, traffic)
            for s in segments:
                s.div_(self.nodes.layout.node_size)

    def node_mean(self, traffic: Traffic) -> None:
        """Average the model's own buffers over the node's ranks only (the intra-node link)."""
        bufs = self.model.buffers
        self.synchronize()
        self._node_sum(bufs, traffic)
        for b in bufs:
            b.div_(self.nodes.layout.node_size)

    def _spread(self, bufs: list[torch.Tensor], traffic: Traffic) -> None:
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

    # -- error feedback's state (TwoPhase; none here) -------------------------------------------------
    def server_state(self) -> dict | None:
        """The chunk owners' residuals for a checkpoint (None without any)."""
        return None

    def load_server_state(self, state: dict | None) -> None:
        pass

    def save_residuals(self) -> tuple | None:
        """Both residuals as they are (a fault-tolerant round that fails puts them back)."""
        return None

    def restore_residuals(self, saved: tuple | None) -> None:
        pass


class Pending:
    """A sum in flight: its cross-node collectives launched. :meth:`finish` completes it on this rank."""

    def __init__(self, reducer: Reducer, bufs: list[torch.Tensor], works: list, started: float, background: bool):
        self.reducer, self.bufs, self.works, self.started = reducer, bufs, works, started
        self.done_at: list[float] = []
        if background:
            for work in works:
                work.get_future().then(self._bucket_done)

    def _bucket_done(self, fut):
        self.done_at.append(time.perf_counter())  # on the communication thread, when a bucket is done
        return None

    def advance(self) -> None:
        """Between an overlapped round's start and its apply step: launch in the background what is ready
        (a compressed bucket's second phase once its first is done), in bucket order, so that every rank
        issues the collectives in the same order whenever each gets to them."""
        for work in self.works:
            ready = getattr(work, "advance", None)
            if ready is not None and not ready(self._bucket_done):
                break

    def finish(self, traffic: Traffic) -> tuple[float, float]:
        """Wait for the collectives (and the device with them), then spread the slices inside the node.
        Returns (seconds of the cross-node collectives, from the launch to the last one done; seconds
        this call blocked for them)."""
        t0 = time.perf_counter()
        for work in self.works:
            if work is not None:
                work.wait()
        self.reducer.synchronize()
        now = time.perf_counter()
        late = any(getattr(w, "in_wait", False) for w in self.works)  # a second phase run by this wait
        comm = max((max(self.done_at) if self.done_at and not late else now) - self.started, 0.0)
        self.works = []
        self.reducer._spread(self.bufs, traffic)
        return comm, now - t0


class AllReduce(Reducer):
    """fp32: one ``all_reduce`` per bucket-sized slice of this rank's cross-node pieces, in place."""

    def round_bytes(self, bufs: list[torch.Tensor]) -> int:
        return tensor_bytes(bufs)

    def _cross(self, bufs, background, traffic, live_here):
        works = []
        for piece in self._pieces(bufs):
            for bucket in slices(piece, self.bucket_bytes) if piece.numel() else ():
                works.append(self.cross.all_reduce(bucket, async_op=background))
                traffic.inter_collectives += 1
        return works


class TwoPhase(TwoPhaseSum, Reducer):
    """The compressed strategy: the two-phase compressed all-reduce of :mod:`risgd_ext.twophase`
    (:class:`~risgd_ext.twophase.TwoPhaseSum`: the bytes, the cross-node sum, error feedback's two
    residuals) inside this module's node level."""


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
