"""The two-phase compressed all-reduce of a compressed run (``compress`` other than none): the
strategy's part of :class:`risgd_ext.reduce.TwoPhase`, which :class:`~risgd_ext.reduce.Reducer`
chooses and wraps in the node level.

Each bucket of this rank's cross-node piece of the parameter displacement is cut into one chunk per
rank of the cross group, and summed in two phases (the codec's encoding and byte counts:
:mod:`risgd_ext.codec`):

1. every rank encodes its N chunks (plus, error feedback, its residual) and an ``all_to_all`` brings
   chunk r's N payloads to rank r, its owner (launched by :meth:`TwoPhaseSum._cross`);
2. :class:`_SecondPhase`: the owner decodes them, sums them in fp32 in rank order (plus, error
   feedback, its own residual), encodes the sum once, and an ``all_gather`` gives every rank every
   owner's encoded sum, which each decodes into the bucket: the same bits on every rank.

The fp32 rest (buffers, slot, a counted round's count) rides as raw bytes in the last bucket's
chunks (:class:`_Rest`), summed exactly by their owners: two collectives per bucket and no more.
A bucket's second phase starts in the background once its first is done (an overlapped round,
between local steps) or at its ``wait()``.

This module imports nothing of :mod:`risgd_ext.reduce`, which imports it: the class that is both a
reducer and this strategy is made there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .codec import CODECS, Codec, chunk_len, two_phase_payload
from .flat import FlatModel
from .topology import NodeGroups, part, slices


class TwoPhaseSum:
    """The parameter displacement, bucket by bucket, through the two-phase compressed all-reduce of
    ``codec`` (:mod:`risgd_ext.codec`); the fp32 rest (buffers, slot, a counted round's count) rides in
    the last bucket's chunks (all-reduced alone where this rank's piece holds no parameters). Error
    feedback keeps two residuals: this rank's (what encoding its own chunks dropped), laid out as the
    flat model, and each chunk owner's (what re-encoding the sum dropped), by (flat buffer, bucket) with
    the group's size and this rank's place in it (an owner's chunk is another after the group changes:
    then it starts again from zero). The fp32 arithmetic runs in two workspaces kept between rounds
    (rows of chunks, the size of the largest bucket); what crosses the network is allocated per round.

    The strategy's own part (its bytes, its cross-node sum, its residuals' state): the reducer of a
    compressed run is :class:`risgd_ext.reduce.TwoPhase`, this class before
    :class:`~risgd_ext.reduce.Reducer`, which gives it the attributes declared below and the node
    level around the cross-node sum."""

    model: FlatModel
    bucket_bytes: int
    nodes: NodeGroups | None
    cross: Any  # the collectives between nodes: risgd_ext.reduce.GroupOps, or risgd_ext.live.LiveNodes
    residual: list[torch.Tensor] | None  # this rank's residuals (error feedback), laid out as the flat model

    def __init__(self, model: FlatModel, bucket_bytes: int, group: dist.ProcessGroup | None = None,
                 nodes: NodeGroups | None = None, synchronize=None, codec: Codec | None = None,
                 error_feedback: bool = False):
        super().__init__(model, bucket_bytes, group, nodes, synchronize)  # Reducer's, next in TwoPhase's order
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

    def __init__(self, reducer: TwoPhaseSum, work, recv: torch.Tensor, bucket: torch.Tensor, chunk: int,
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
