"""The collectives of a round: how buffers laid out as the flat model are summed over the ranks. One
strategy per run, chosen by ``Reducer(...)`` from its arguments:

- :class:`AllReduce` (fp32): one ``all_reduce`` per bucket-sized slice, in place;
- :class:`TwoPhase` (``compress`` other than none): each bucket of the parameter displacement is
  summed by the two-phase compressed all-reduce of :mod:`risgd_ext.codec` (all_to_all of encoded
  chunks to their owners, fp32 sums there, one re-encoding, all_gather), with two residuals of error
  feedback: each rank's (what encoding its own chunks dropped) and each chunk owner's (what
  re-encoding the sum dropped); the fp32 rest (buffers, slot, a counted round's count) rides in the
  last bucket's chunks, summed exactly by their owners.

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

from .codec import CODECS, Codec, chunk_len, two_phase_payload
from .flat import SLOT, FlatModel
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


class TwoPhase(Reducer):
    """The parameter displacement, bucket by bucket, through the two-phase compressed all-reduce of
    ``codec`` (:mod:`risgd_ext.codec`); the fp32 rest (buffers, slot) all-reduced. Error feedback keeps
    two residuals: this rank's (what encoding its own chunks dropped), laid out as the flat model, and
    each chunk owner's (what re-encoding the sum dropped), by (flat buffer, bucket) with the group's size
    and this rank's place in it (an owner's chunk is another after the group changes: then it starts
    again from zero). The fp32 arithmetic runs in two workspaces kept between rounds (rows of chunks,
    the size of the largest bucket); what crosses the network is allocated per round."""

    def __init__(self, model: FlatModel, bucket_bytes: int, group: dist.ProcessGroup | None = None,
                 nodes: NodeGroups | None = None, synchronize=None, codec: Codec | None = None,
                 error_feedback: bool = False):
        super().__init__(model, bucket_bytes, group, nodes, synchronize)
        self.codec, self.error_feedback = codec, error_feedback
        self.server_residual: dict[tuple[int, int], torch.Tensor] = {}
        self.server_owner: tuple[int, int] | None = None
        self._work: list[torch.Tensor] = []

    def round_bytes(self, bufs: list[torch.Tensor]) -> int:
        """The compressed parameter displacement as the two-phase round counts it (N chunk payloads,
        scales and padding included) plus the fp32 rest, which rides in the last bucket's chunks
        (N chunks of ceil(rest / N) fp32 values)."""
        ranks = self.cross.size
        total = 0
        for local in range(self.nodes.layout.node_size if self.nodes is not None else 1):
            pieces = [self._split(buf, i, local) for i, buf in enumerate(bufs)]
            rest = sum(tail.numel() for _, tail, _ in pieces)
            for head, _, _ in pieces:
                total += sum(two_phase_payload(self.codec, b.numel(), ranks) for b in slices(head, self.bucket_bytes))
            if not any(head.numel() for head, _, _ in pieces):  # no parameters here: the rest all-reduced (_cross)
                total += 4 * rest
            elif rest:
                total += two_phase_payload(CODECS["none"], rest, ranks)
        return total

    def _split(self, buf: torch.Tensor, i: int, local: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's cross-node piece of ``buf`` as (the parameter part, the rest, its offset)."""
        k = self.nodes.layout.node_size if self.nodes is not None else 1
        piece = part(buf, local, k)
        offset = buf.numel() * local // k
        params = self.model.flats[i].num_param_elems if i < len(self.model.flats) else 0
        cut = min(max(params - offset, 0), piece.numel())
        return piece[:cut], piece[cut:], offset

    def _rows(self, size: int, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two fp32 workspaces as (size, cp) rows (grown to the largest bucket, then kept)."""
        need = max(size, 2) * cp
        if not self._work or self._work[0].numel() < need:
            device = self.model.flats[0].buffer.device
            self._work = [torch.empty(need, dtype=torch.float32, device=device) for _ in range(2)]
        return tuple(w[:size * cp].view(size, cp) for w in self._work)

    def _owner_rows(self, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An owner's sum and its encoding's scratch, (1, cp) each, in the second workspace (the first
        holds the decoded payloads meanwhile)."""
        pair = self._work[1][:2 * cp].view(2, cp)
        return pair[:1], pair[1:]

    def _cross(self, bufs, background, traffic, live_here):
        """Each bucket's first phase (encode, all_to_all to the chunks' owners) is launched here; its
        second (the owner's sum, re-encoded, all_gather, decode) runs at the work's ``wait()``: here when
        blocking (after all the first phases: the same order of operations either way, so a fault-tolerant
        round can be joined blocking by a node whose peers run it overlapped). The fp32 rest (buffers,
        slot, a counted round's count) rides in the last bucket's chunks, summed exactly by their owners:
        a round is two collectives per bucket and no more."""
        cross, codec = self.cross, self.codec
        size, me = cross.size, cross.rank
        local = self.nodes.local if self.nodes is not None else 0
        step = max(1, self.bucket_bytes // 4)
        pieces = [self._split(buf, i, local) for i, buf in enumerate(bufs)]
        rest = [tail for _, tail, _ in pieces if tail.numel()]
        buckets = [(i, j, offset + j * step, bucket) for i, (head, _, offset) in enumerate(pieces)
                   for j, bucket in enumerate(slices(head, self.bucket_bytes))]
        if not buckets:  # nothing of the parameters here: the fp32 rest alone, all-reduced
            works = [cross.all_reduce(t, async_op=background) for t in rest]
            traffic.inter_collectives += len(works)
            return works
        works = []
        for k, (i, j, start, bucket) in enumerate(buckets):
            n = bucket.numel()
            c = chunk_len(codec, n, size)
            x, tmp = self._rows(size, codec.padded(c))
            ef = self.error_feedback and live_here
            residual = self._residual(i, start, n) if ef else None
            _to_rows(bucket, x, c, residual)
            extra = _Rest(rest, size) if k == len(buckets) - 1 and rest else None
            pb = int(codec.nbytes(c))
            send = torch.empty(size, pb + (extra.nbytes if extra else 0), dtype=torch.uint8, device=bucket.device)
            sent = codec.encode_rows(x, c, send[:, :pb], tmp, lossy=ef)
            if ef:  # what this rank's encoding dropped, kept for its next round
                _from_rows(x, c, residual, minus=sent)
            if extra is not None:
                extra.pack(send[:, pb:])
            recv = torch.empty_like(send)
            work = cross.all_to_all_single(recv.view(-1), send.view(-1), async_op=True)
            owned = self._server_residual((i, j), c, (size, me)) if self.error_feedback else None
            works.append(_SecondPhase(self, work, recv, bucket, c, owned, extra))
            traffic.inter_collectives += 2
        if not background:
            for w in works:
                w.wait()
        return works

    def _residual(self, i: int, start: int, n: int) -> torch.Tensor:
        if self.residual is None:
            self.residual = [torch.zeros_like(f.buffer) for f in self.model.flats]
        return self.residual[i][start:start + n]

    def _server_residual(self, key: tuple[int, int], n: int, owner: tuple[int, int]) -> torch.Tensor:
        """The owner's residual of bucket ``key`` (n values): zeros at first, or after the group changed."""
        if self.server_owner != owner:
            self.server_residual, self.server_owner = {}, owner
        r = self.server_residual.get(key)
        if r is None or r.numel() != n:
            device = self.model.flats[0].buffer.device
            r = self.server_residual[key] = torch.zeros(n, dtype=torch.float32, device=device)
        return r

    def server_state(self) -> dict | None:
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
        if not self.error_feedback:
            return None
        mine = [r.clone() for r in self.residual] if self.residual is not None else None
        return mine, {k: v.clone() for k, v in self.server_residual.items()}, self.server_owner

    def restore_residuals(self, saved: tuple | None) -> None:
        if saved is not None:
            self.residual, self.server_residual, self.server_owner = saved


def _to_rows(bucket: torch.Tensor, rows: torch.Tensor, c: int, plus: torch.Tensor | None) -> None:
    """``bucket`` (+ ``plus``) cut into chunks of ``c`` values, one a row of ``rows``, zeros elsewhere."""
    n = bucket.numel()
    q, r = divmod(n, c)
    if plus is None:
        rows[:q, :c].copy_(bucket[:q * c].view(q, c))
    else:
        torch.add(bucket[:q * c].view(q, c), plus[:q * c].view(q, c), out=rows[:q, :c])
    if r:
        if plus is None:
            rows[q, :r].copy_(bucket[q * c:])
        else:
            torch.add(bucket[q * c:], plus[q * c:], out=rows[q, :r])
        rows[q, r:].zero_()
        q += 1
    rows[q:].zero_()
    rows[:q, c:].zero_()


def _from_rows(rows: torch.Tensor, c: int, out: torch.Tensor, minus: torch.Tensor | None = None) -> None:
    """The first ``out.numel()`` values of ``rows``' chunks (less ``minus``'s) into ``out``."""
    n = out.numel()
    q, r = divmod(n, c)
    if minus is None:
        out[:q * c].view(q, c).copy_(rows[:q, :c])
        if r:
            out[q * c:].copy_(rows[q, :r])
    else:
        torch.sub(rows[:q, :c], minus[:q, :c], out=out[:q * c].view(q, c))
        if r:
            torch.sub(rows[q, :r], minus[q, :r], out=out[q * c:])


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


class _Rest:
    """The fp32 rest of a compressed round (``tails``: buffers, slot, count) in ``size`` chunks of
    ceil(rest / size) values, appended to the last bucket's chunk payloads as raw fp32 bytes."""

    def __init__(self, tails: list[torch.Tensor], size: int):
        self.tails, self.size = tails, size
        self.numel = sum(t.numel() for t in tails)
        self.chunk = -(-self.numel // size)
        self.nbytes = 4 * self.chunk

    def pack(self, out: torch.Tensor) -> None:
        """Into ``out`` ((size, nbytes) uint8): chunk r of the rest in row r, zeros past its end."""
        flat = torch.zeros(self.size * self.chunk, dtype=torch.float32, device=out.device)
        torch.cat(self.tails, out=flat[:self.numel])
        out.copy_(flat.view(self.size, self.chunk).view(torch.uint8))

    def owner_sum(self, parts: torch.Tensor) -> torch.Tensor:
        """The sum in rank order of the ``size`` chunks this rank owns (rows of raw bytes), as bytes."""
        values = parts.clone(memory_format=torch.contiguous_format).view(torch.float32)
        total = values[0].clone()
        for r in range(1, self.size):
            total.add_(values[r])
        return total.view(torch.uint8)

    def unpack(self, gathered: torch.Tensor) -> None:
        """Every owner's sum (rows of raw bytes) back into the tails."""
        flat = gathered.clone(memory_format=torch.contiguous_format).view(torch.float32).view(-1)
        offset = 0
        for t in self.tails:
            t.copy_(flat[offset:offset + t.numel()])
            offset += t.numel()


class _SecondPhase:
    """One bucket's two-phase compressed all-reduce after its first phase was launched (the all_to_all
    that brings this rank the N payloads of the chunk it owns). The second phase: the owner's fp32 sum
    in rank order, plus its residual, encoded once; the all_gather of every owner's encoded sum; every
    rank decodes the same N payloads into the bucket (the same bits on every rank). :meth:`advance`
    starts it in the background once the first phase is done (an overlapped round, between local
    steps); :meth:`wait` completes it (starting it first if nothing did)."""

    def __init__(self, reducer: TwoPhase, work, recv: torch.Tensor, bucket: torch.Tensor, chunk: int,
                 owned: torch.Tensor | None, rest: _Rest | None = None):
        self.reducer, self.work, self.recv, self.bucket = reducer, work, recv, bucket
        self.chunk, self.owned, self.rest = chunk, owned, rest
        self.gather, self.gathered = None, None  # the all_gather (launched in the background) and its output
        self.launched = self.in_wait = self.done = False
        self.error: BaseException | None = None  # the first phase's failure, seen by advance(), raised by wait()

    def get_future(self):
        return self.work.get_future()

    def advance(self, on_done=None) -> bool:
        """Launch the second phase in the background if the first is done; returns whether it is launched
        (or failed: :meth:`wait` raises it). ``on_done``: a callback for the all_gather's future."""
        if self.launched or self.error is not None:
            return True
        completed = getattr(self.work, "is_completed", None)
        if completed is None or not completed():
            return False
        try:
            self._second(background=True, on_done=on_done)
        except Exception as e:  # a peer gone: the round's wait() raises it, where a failed round is handled
            self.error = e
        return True

    def _second(self, background: bool, on_done=None) -> None:
        self.work.wait()
        reducer, codec, c = self.reducer, self.reducer.codec, self.chunk
        size, pb = self.recv.shape[0], int(codec.nbytes(c))
        cp = codec.padded(c)
        decoded, _ = reducer._rows(size, cp)
        codec.decode_rows(self.recv[:, :pb], c, decoded)
        total, scratch = reducer._owner_rows(cp)
        total.copy_(decoded[:1])
        for r in range(1, size):  # in rank order: the same fp32 additions on every owner
            total.add_(decoded[r:r + 1])
        mine = torch.empty(1, self.recv.shape[1], dtype=torch.uint8, device=self.recv.device)
        if self.owned is None:
            codec.encode_rows(total, c, mine[:, :pb], scratch)
        else:  # what re-encoding the sum dropped, added to the next round's sum
            total[0, :c].add_(self.owned)
            sent = codec.encode_rows(total, c, mine[:, :pb], scratch, lossy=True)
            torch.sub(total[0, :c], sent[0, :c], out=self.owned)
        if self.rest is not None:
            mine[0, pb:].copy_(self.rest.owner_sum(self.recv[:, pb:]))
        self.gathered = torch.empty_like(self.recv)
        self.launched = True
        self.gather = reducer.cross.all_gather_single(self.gathered.view(-1), mine.view(-1), async_op=background)
        if background and on_done is not None:
            self.gather.get_future().then(on_done)

    def wait(self) -> None:
        if self.done:
            return
        if self.error is not None:
            raise self.error
        if not self.launched:
            self.in_wait = True  # the second phase ran here, not behind the steps
            self._second(background=False)
        if self.gather is not None:
            self.gather.wait()
        codec, c = self.reducer.codec, self.chunk
        pb = int(codec.nbytes(c))
        decoded, _ = self.reducer._rows(self.recv.shape[0], codec.padded(c))
        codec.decode_rows(self.gathered[:, :pb], c, decoded)
        _from_rows(decoded, c, self.bucket)
        if self.rest is not None:
            self.rest.unpack(self.gathered[:, pb:])
        self.recv = self.gathered = self.gather = None
        self.done = True


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
