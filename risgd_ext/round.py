"""One averaging round, its whole life in one place: send, wait, apply, view, state.

A round is made by :meth:`Averaging.round` with the set of live workers (:class:`Live`: the failure
schedule's complement; in a fault-tolerant run, of the quorum's nodes, ``risgd_ext.live``) and, for
an overlapped round, the optimizer step at which its average is applied:

- :meth:`Round.start` fills what the round sends (seam 1, :class:`Displacement`: the fp32
  displacement ``x - a`` from the anchor, plus the float buffers and ``||x - a||²``; a rank of a
  down worker sends zeros) and, overlapped, launches its collectives in the background; with a
  ``compress`` codec the reducer encodes the displacement's cross-node part (``risgd_ext.codec``);
- :meth:`Round.advance` (overlapped, after each local step) launches what of the sum is ready in the
  background (a compressed round's second phase once its first is done); it changes no bits;
- :meth:`Round.wait` completes the sum (blocking: runs it whole);
- :meth:`Round.apply` turns the sum into the new model (seam 2: :data:`REPLACE`, the average
  replaces the model; overlapped, :data:`KEEP_PROGRESS`, ``x <- x̄ + (x - x_sent)``) and moves the
  anchor: ``a <- x̄``, or with an outer optimizer ``torch.optim.SGD`` on ``a`` with gradient
  ``a - x̄``, the model then taking the new anchor in place of ``x̄`` (overlapped: ``a' + (x - x_sent)``);
- :meth:`Round.viewed` shows the averaged model without changing anything (``averaged()``);
- :meth:`Round.state_dict` / :meth:`Round.from_state`: a round in flight in a checkpoint.

Every phase returns a :class:`RoundReport` of what it did (bytes, seconds, collectives, the
divergence); the controller adds them up. Nothing is read out of the round afterwards.

A blocking round reduces the model's own flat buffers in place (no copy); an overlapped round
reduces a pair of scratch buffers while the model trains on, and is applied at a step the schedule
fixes, never when the network finished, so the trajectory does not depend on the link.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from risgd_common.layout import Layout

from .codec import Codec
from .flat import SLOT, FlatModel, sq_norm
from .live import AnchorsDiffer
from .reduce import Pending, Reducer, Traffic

# A counted round's count carries each contributing node's vote on its anchor: NIBBLES 4-bit pieces f
# of a fingerprint, as f and f^2. All contributors hold one anchor iff n * sum(f^2) == sum(f)^2 for
# every piece (n: the count); fp32 sums of these small integers are exact up to 74,565 contributing
# ranks. 6 pieces: a 24-bit fingerprint.
NIBBLES = 6
ANCHOR_SAMPLE = 1024  # values per flat buffer's anchor, strided over it


class NoFiniteContribution(RuntimeError):
    """A round in which no contribution was finite: there is no average to go on from."""


@dataclass(frozen=True)
class Live:
    """The workers that take part in a round, out of ``total``."""

    workers: frozenset[int]
    total: int

    @classmethod
    def without(cls, down: frozenset[int], total: int) -> Live:
        return cls(frozenset(range(total)) - down, total)

    @property
    def down(self) -> frozenset[int]:
        return frozenset(range(self.total)) - self.workers


@dataclass
class RoundReport:
    """What one phase of a round did on this rank."""

    bytes_sent: int = 0          # payload between nodes (flat: between ranks)
    comm_seconds: float = 0.0    # the collectives between nodes
    waited: float = 0.0          # seconds this rank blocked for an overlapped round's sum
    divergence: float | None = None  # set by apply: mean_j ||x_j - x̄||² / ||x̄||² (nan: not measured)
    left_out: int = 0            # set by wait: contributions left out because they were not finite
    healed: bool = False         # set by apply: this rank's own contribution was not finite; it took the average
    traffic: Traffic = field(default_factory=Traffic)


# -- seam 1: what a round sends ------------------------------------------------------------------
class Displacement:
    """The fp32 displacement from the anchor, ``d = x - a``, with the float buffers as they are and
    ``||d||²`` in the slot (when the divergence is measured). A rank of a down worker sends zeros
    (weight 0). Blocking and unmeasured, the model itself is sent in place (its mean equals
    ``a + mean_j d_j`` in exact arithmetic and saves the anchor's passes)."""

    def fill_in_place(self, model: FlatModel, live_here: bool, measure: bool, displace: bool = False) -> None:
        """The payload written over the model's own buffers (a blocking round). ``displace``: send
        ``x - a`` even unmeasured (an outer step needs the anchor, a codec small values)."""
        if not live_here:
            for b in model.buffers:
                b.zero_()  # a failed rank contributes weight 0 and takes the average
        elif measure:
            model.displace()
        else:
            if displace:
                for f, a in zip(model.flats, model.anchors):
                    f.params.sub_(a)
            model.slot.zero_()

    def fill(self, model: FlatModel, out: list[torch.Tensor], live_here: bool, measure: bool,
             src: list[torch.Tensor] | None = None) -> None:
        """The payload written into ``out`` (laid out as the model's buffers); the model is kept.
        ``src``: buffers laid out as the model's to send instead of the model (a retried round
        sends the model as it was at its first send)."""
        if not live_here:
            for s in out:
                s.zero_()
            return
        xs = src if src is not None else model.buffers
        for s, b, f in zip(out, xs, model.flats):
            s[f.num_param_elems:].copy_(b[f.num_param_elems:])  # buffers (and slot) as they are
        if measure:
            model.displace(out=out, src=src)
        else:
            for s, b, f, a in zip(out, xs, model.flats, model.anchors):
                torch.sub(b[: f.num_param_elems], a, out=s[: f.num_param_elems])
            out[0][-SLOT:].zero_()

    def seal(self, model: FlatModel, out: list[torch.Tensor], live_here: bool, measure: bool) -> bool:
        """Check the filled payload ``out`` and write this rank's count into the slot: 1 when it contributes,
        0 when it is down or its payload is not finite (NaN or inf: then it is replaced by zeros, and the
        worker is left out as a down one is). Returns whether it contributes. One dot product over what the
        measurement did not already cover (the parameters' ``||d||²`` is in the slot when measured)."""
        ok = live_here
        if live_here:
            parts = [out[0][-SLOT:-SLOT + 1].float()] if measure else []
            for i, (o, f) in enumerate(zip(out, model.flats)):
                start, end = (f.num_param_elems if measure else 0), o.numel() - (SLOT if i == 0 else 0)
                if end > start:
                    parts.append(sq_norm(o[start:end]).reshape(1).float().to(parts[0].device if parts else o.device))
            ok = bool(torch.isfinite(torch.cat(parts)).all()) if parts else True
            if not ok:
                for o in out:
                    o.zero_()
        out[0][-1:].fill_(1.0 if ok else 0.0)
        return ok


# -- seam 2: how a round's result is applied -----------------------------------------------------
class Replace:
    """The average replaces the model (it was computed in the model's own buffers)."""

    def apply(self, model: FlatModel, mean: list[torch.Tensor], sent: list[torch.Tensor]) -> None:
        for b, m in zip(model.buffers, mean):
            if b is not m:
                b.copy_(m)


class KeepProgress:
    """``x <- x̄ + (x - x_sent)``: the average plus this rank's progress since the send. With no
    step taken since, ``x - x_sent`` is exactly 0 and every rank ends bit-identical at ``x̄``."""

    def apply(self, model: FlatModel, mean: list[torch.Tensor], sent: list[torch.Tensor]) -> None:
        for m, s, b in zip(mean, sent, model.buffers):
            torch.sub(b, s, out=s)   # this rank's progress since the send
            torch.add(m, s, out=b)   # x̄ + progress
        model.slot.zero_()


DISPLACEMENT, REPLACE, KEEP_PROGRESS = Displacement(), Replace(), KeepProgress()


class Averaging:
    """What every round of a run shares: the flat model, its reducer, the layout, this rank's worker,
    whether a node's ranks differ at a round (``node_sum``), and whether divergence is measured."""

    def __init__(self, model: FlatModel, reducer: Reducer, layout: Layout, rank: int, node_sum: bool = False,
                 measure_divergence: bool = True):
        self.model, self.reducer, self.layout = model, reducer, layout
        self.worker = layout.worker_of(rank)
        self.node_sum, self.measure = node_sum, measure_divergence
        self.sends = DISPLACEMENT
        # unmeasured blocking rounds send the model itself unless the anchor must move with them
        self.displace_always = model.outer is not None or reducer is not None and reducer.codec is not None
        self._packed: torch.Tensor | None = None  # extras (optimizer state) of blocking rounds, reused

    @classmethod
    def build(cls, params: list[torch.Tensor], buffers: list[torch.Tensor], bucket_bytes: int, layout: Layout,
              rank: int, group=None, nodes=None, synchronize=None, node_sum: bool = False,
              measure_divergence: bool = True, outer: tuple[float, float, bool] | None = None,
              codec: Codec | None = None, error_feedback: bool = False) -> Averaging:
        """The flat model of ``params`` and ``buffers`` (identical on every rank: the first anchor)
        and its reducer over ``group`` (flat) or ``nodes`` (the node level's groups). ``outer``:
        (lr, momentum, nesterov) of an outer step; ``codec``: how the cross-node part is compressed."""
        model = FlatModel(params, buffers)
        if outer is not None:
            model.set_outer(*outer)
        reducer = Reducer(model, bucket_bytes, group, nodes, synchronize, codec, error_feedback)
        return cls(model, reducer, layout, rank, node_sum, measure_divergence)

    def contributions(self, live: Live) -> int:
        """How many contributions a round's sum holds: one per live rank, or, at the node level
        with synchronous nodes, one per live node (its ranks are identical and only the cross
        groups reduce)."""
        if self.node_sum or not self.layout.hierarchical:
            return len(live.workers) * self.layout.node_size
        return len(live.workers)

    def round(self, live: Live, apply_step: int | None = None, live_here: bool | None = None,
              counted: bool = False, resend: Round | None = None, plain: bool = False) -> Round:
        """A round over ``live``: blocking (``apply_step`` None) or overlapped, applied at that step.

        A fault-tolerant run's rounds are ``counted``: they run in scratch buffers (a failed round
        leaves the model as it was) and each rank adds its contribution (1, or 0 when not
        ``live_here``: a joiner, a node marked down) to a count summed with them, by which the
        average divides. ``resend``: an overlapped round that failed, sent again (blocking) with the
        model as it was at its first send, applied at its step as it would have been. ``plain``: the average
        replaces the anchor with no outer step (a warm-up step's round in a fault-tolerant run)."""
        return Round(self, live, apply_step if resend is None else resend.apply_step, live_here, counted, resend,
                     plain)

    def pack(self, extras: list[torch.Tensor], live_here: bool) -> torch.Tensor:
        total = sum(t.numel() for t in extras)
        if self._packed is None or self._packed.numel() != total:
            self._packed = torch.empty(total, dtype=extras[0].dtype, device=extras[0].device)
        if live_here:
            torch.cat([t.detach().flatten() for t in extras], out=self._packed)
        else:
            self._packed.zero_()
        return self._packed


class Round:
    """One round; see the module docstring for its life."""

    def __init__(self, avg: Averaging, live: Live, apply_step: int | None, live_here: bool | None = None,
                 counted: bool = False, resend: Round | None = None, plain: bool = False):
        self.avg, self.live, self.apply_step = avg, live, apply_step
        self.live_here = avg.worker in live.workers if live_here is None else live_here
        self.num_live = avg.contributions(live)
        self.overlapped = apply_step is not None
        self.applies = KEEP_PROGRESS if self.overlapped else REPLACE
        self.counted, self.resending = counted, resend is not None
        self.in_scratch = self.overlapped or counted  # the model is never summed in place
        self.background = self.overlapped and resend is None  # launched at start, waited for at its step
        self.count: torch.Tensor | None = None  # counted: this rank's contribution, then their sum
        self.sent: list[torch.Tensor] = []   # overlapped: the model at the send
        self.sums: list[torch.Tensor] = []   # what is reduced, then the sum
        self.extras: list[torch.Tensor] = []
        self.complete = False
        self.contributes, self.non_finite = self.live_here, False
        self.plain = plain  # no outer step (a warm-up step's round)
        self.saved_residuals: tuple | None = None  # a fault-tolerant overlapped round: both residuals before it
        self.committed = False  # a fault-tolerant resend committed ahead of its apply step
        self.nbytes, self.comm_seconds = 0, 0.0
        self._pending: Pending | None = None  # an overlapped round's sum in flight

    # -- send --------------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, extras: list[torch.Tensor] | None = None) -> RoundReport:
        """Fill the payload; overlapped, launch the sum in the background. ``extras`` (blocking
        only): more tensors averaged with the model, such as optimizer state."""
        avg, model = self.avg, self.avg.model
        report = RoundReport()
        if not self.in_scratch:
            self.sums = model.buffers
            if extras:
                self.extras = extras
                self.sums = self.sums + [avg.pack(extras, self.live_here)]
            avg.sends.fill_in_place(model, self.live_here, avg.measure, avg.displace_always)
            self._seal(self.sums)
            self.nbytes = report.bytes_sent = avg.reducer.round_bytes(self.sums)
            return report
        if extras:
            raise ValueError("an overlapped or fault-tolerant round averages no extra tensors")
        self.sent, self.sums = model.scratch()
        if self.overlapped and not self.resending:
            for s, b in zip(self.sent, model.buffers):
                s.copy_(b)  # x at the send, buffers included (a resent round's is still there)
        avg.sends.fill(model, self.sums, self.live_here, avg.measure, self.sent if self.overlapped else None)
        self._seal(self.sums)
        if self.counted:
            self.count = anchor_vote(model, self.contributes).to(self.sums[0].device)
        self.nbytes = report.bytes_sent = avg.reducer.round_bytes(self._reduced())
        if self.background:
            self._pending = avg.reducer.launch(self._reduced(), avg.node_sum, report.traffic, self.contributes,
                                               background=True)
        return report

    def _seal(self, payload: list[torch.Tensor]) -> None:
        """This rank's count, once its payload is checked; a non-finite one is left out and, at apply, takes
        the average whole (its own progress is not finite either)."""
        avg = self.avg
        self.contributes = avg.sends.seal(avg.model, payload[: len(avg.model.flats)], self.live_here, avg.measure)
        if self.live_here and not self.contributes:
            self.non_finite = True
            self.applies = REPLACE
            if len(payload) > len(avg.model.flats):  # the packed extras (optimizer state)
                payload[-1].zero_()

    def _reduced(self) -> list[torch.Tensor]:
        """What the collectives sum: the payload, and the count of a counted round."""
        return self.sums + [self.count] if self.count is not None else self.sums

    @torch.no_grad()
    def advance(self) -> None:
        """Between an overlapped round's start and its apply step (after each local step): launch in the
        background what of its sum is ready (a compressed round's second phase). Changes no bits."""
        if self._pending is not None:
            self._pending.advance()

    # -- wait --------------------------------------------------------------------------------------
    @torch.no_grad()
    def wait(self) -> RoundReport:
        """Complete the sum on this rank (blocking: run it; overlapped: wait for it)."""
        report = RoundReport()
        if self.complete:
            return report
        if self.background:  # launched at start
            self.comm_seconds, report.waited = self._pending.finish(report.traffic)
            self._pending = None
        else:
            pending = self.avg.reducer.launch(self._reduced(), self.avg.node_sum, report.traffic, self.contributes)
            self.comm_seconds = pending.finish(report.traffic)[0]
        report.comm_seconds = self.comm_seconds
        if self.count is None:  # the summed counts of the slot: the contributions that were finite
            expected = self.num_live
            self.num_live = int(round(float(self.sums[0][-1])))
            report.left_out = max(expected - self.num_live, 0)
            if self.num_live < 1:
                raise NoFiniteContribution("every contribution to this round was non-finite (NaN or inf)")
        else:
            votes = self.count.tolist()
            self.num_live = int(round(votes[0]))
            if self.num_live < 1:
                raise RuntimeError("a round with no contribution: every node in it was a joiner or marked down")
            if not anchors_agree(votes):
                raise AnchorsDiffer(f"the {self.num_live} contributions to this round come from nodes holding "
                                    "different anchors (their last averages differ): a node resumed from another "
                                    "checkpoint or timeline, or nodes trained apart; refusing to go on: resume every "
                                    "node from one checkpoint tag")
        self.complete = True
        return report

    # -- apply -------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> RoundReport:
        """The sum becomes the new model and the anchor (:meth:`wait` first)."""
        if not self.complete:
            raise RuntimeError("apply() before wait()")
        avg, model, n = self.avg, self.avg.model, self.num_live
        report = RoundReport()
        if self.extras:
            packed, offset = self.sums[-1], 0
            packed.div_(n)
            for t in self.extras:
                t.copy_(packed[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        sums = self.sums[: len(model.flats)]
        if avg.measure:
            report.divergence = model.finish(sums, n, self.plain)
        elif self.in_scratch or avg.displace_always:
            model.finish_unmeasured(sums, n, self.plain)
            report.divergence = float("nan")
        else:  # the model itself was summed in place: its mean, the anchor left as it is
            for s in sums:
                s.div_(n)
            report.divergence = float("nan")
        self.applies.apply(model, sums, self.sent)
        report.healed = self.non_finite
        return report

    # -- view --------------------------------------------------------------------------------------
    @contextmanager
    def viewed(self) -> Iterator[None]:
        """Inside, the model holds the average :meth:`apply` will compute (:meth:`wait` first);
        afterwards it is exactly as before. For an overlapped round: a blocking round applies at
        once and has nothing to show."""
        model = self.avg.model
        view = model.mean_of(self.sums, self.num_live, self.plain)
        stash = [b.clone() for b in model.buffers]
        for b, v in zip(model.buffers, view):
            b.copy_(v)
        try:
            yield
        finally:
            for b, saved in zip(model.buffers, stash):
                b.copy_(saved)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The round, complete (:meth:`wait` first), for a checkpoint."""
        if not self.complete:
            raise RuntimeError("state_dict() of a round in flight: wait() first")
        return {"apply_step": self.apply_step, "num_live": self.num_live, "nbytes": self.nbytes,
                "comm_seconds": self.comm_seconds, "sent": [t.detach().cpu() for t in self.sent],
                "sums": [t.detach().cpu() for t in self.sums],
                "live_workers": sorted(self.live.workers), "workers": self.live.total, "non_finite": self.non_finite}

    @classmethod
    def from_state(cls, avg: Averaging, state: dict) -> Round:
        """A saved, complete overlapped round, in ``avg.model``'s scratch buffers."""
        total = state.get("workers", avg.layout.workers)
        live = Live(frozenset(state.get("live_workers", range(total))), total)
        r = cls(avg, live, state["apply_step"])
        r.num_live = state["num_live"]  # as saved (a checkpoint written before the live set was)
        r.nbytes, r.comm_seconds, r.complete = state["nbytes"], state["comm_seconds"], True
        if state.get("non_finite"):
            r.non_finite, r.contributes, r.applies = True, False, REPLACE
        r.sent, r.sums = avg.model.scratch()
        for mine, saved in zip(r.sent + r.sums, list(state["sent"]) + list(state["sums"])):
            if saved.numel() == mine.numel() - 1:  # written before the slot carried the count: [.., ||d||²]
                mine[:-1].copy_(saved)
                mine[-1:].fill_(r.num_live)
            else:
                mine.copy_(saved)
        return r


def anchor_vote(model: FlatModel, contributes: bool) -> torch.Tensor:
    """This rank's count and anchor vote for a counted round: ``[c, c*f_1, c*f_1^2, ...]`` with c = 1
    (it contributes) or 0 (a joiner, a node marked down: no vote) and f_k the 4-bit pieces of a
    fingerprint of a strided sample of the anchor (cheap: ANCHOR_SAMPLE values per flat buffer)."""
    vote = torch.zeros(1 + 2 * NIBBLES, dtype=torch.float32)
    if not contributes:
        return vote
    sample = torch.cat([a[:: max(1, a.numel() // ANCHOR_SAMPLE)][:ANCHOR_SAMPLE].detach().float().cpu()
                        for a in model.anchors if a.numel()])
    digest = hashlib.blake2b(sample.numpy().tobytes(), digest_size=NIBBLES // 2 + 1).digest()
    pieces = [(digest[i // 2] >> (4 * (i % 2))) & 15 for i in range(NIBBLES)]
    vote[0] = 1.0
    for i, f in enumerate(pieces):
        vote[1 + 2 * i], vote[2 + 2 * i] = float(f), float(f * f)
    return vote


def anchors_agree(votes: list[float]) -> bool:
    """Whether the summed votes say every contributor held one anchor (Cauchy-Schwarz: n * sum(f^2) ==
    sum(f)^2 only when all f are equal); a count without votes (an old peer's) agrees."""
    n = votes[0]
    return all(abs(n * votes[2 + 2 * i] - votes[1 + 2 * i] ** 2) < 0.5 for i in range((len(votes) - 1) // 2))
