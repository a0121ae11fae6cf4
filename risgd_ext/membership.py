"""Who takes part in each round, in one room: the one owner of the membership of a run.

:class:`Membership` decides which workers are live in a round (:meth:`Membership.live_of_round`):
the simulated failure schedule's complement (:func:`failed_workers`, the paper's section 4.4) and,
in a fault-tolerant run (``fault_tolerance: torchft``), of the nodes torchft's quorum holds. It
alone keeps what follows from that: the last quorum's nodes, the changes seen
(:class:`~risgd_ext.live.MembershipEvent`), the step this node was healed to, the seconds its
quorums took, and the floor (``min_nodes`` live nodes and the caller's ``accept``), checked here
only (:meth:`Membership.below_floor`). Its fault-tolerant round (:meth:`Membership.live_round`:
quorum, floor, the round's phases, commit, retried among the survivors) returns a
:class:`LiveRoundReport`: the controller adds it to its counters; nothing here touches them.

The floor's one name inside is ``min_nodes`` (the engine's key ``risgd.min_nodes``; the trainer's
recipe key ``elastic.min_workers`` is resolved into it). The trainer reads a frozen
:class:`MembershipView` (:meth:`Membership.view`), never this object's state.

The failure schedule is a pure function of the config and the round number, so every rank computes
the same answer without a collective. Entries name workers: ranks in a flat run, nodes with the node
level (``node_size`` > 1). A down worker's ranks keep running (this simulates the failure): they
contribute weight 0 to the average and take the averaged model, as a rejoining worker would.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import RandomFailure, RISGDConfig, StaticFailure
from .live import LIGHTHOUSE_REJOIN_S, AnchorsDiffer, BelowFloor, LiveNodes, MembershipEvent, Quorum, RunOver
from .round import REPLACE, Averaging, Live, Round, RoundReport


def failed_workers(cfg: RISGDConfig, round_index: int, workers: int) -> frozenset[int]:
    """The set of workers (of ``workers``) that are down in averaging round ``round_index`` (0-based)."""
    down: set[int] = set()
    for i, failure in enumerate(cfg.failures):
        if isinstance(failure, StaticFailure):
            if failure.start_round <= round_index and (failure.end_round is None or round_index < failure.end_round):
                down.update(failure.ranks)
        elif isinstance(failure, RandomFailure) and round_index >= failure.start_round:
            # One generator per (entry, round): independent of how many rounds ran before, so a
            # resumed run draws the same failures as an uninterrupted one.
            rng = random.Random(f"{failure.seed}:{i}:{round_index}")
            if rng.random() < failure.prob:
                down.update(rng.sample(range(workers), failure.count))
    if len(down) >= workers:
        raise RuntimeError(
            f"round {round_index}: every worker is marked failed by the 'risgd.failures' schedule; "
            "at least one worker must stay live: shorten the overlapping failure ranges"
        )
    return frozenset(down)


@dataclass(frozen=True)
class MembershipView:
    """What the trainer may read of the membership, as it stands (a copy: changing it changes nothing).
    The data coverage of ``live_workers`` is the trainer's to compute (the engine knows no data)."""

    workers: int                          # the run's workers (nodes of an elastic run)
    members: frozenset[int]               # the workers whose nodes run now (the last quorum's; else all)
    live_workers: frozenset[int]          # those that took part in the last round (members less the down)
    quorum_id: int | None                 # the current quorum (None: not a fault-tolerant run, or none yet)
    healing: bool                         # this node was healed from a live peer in the current quorum
    quorum_seconds: float                 # the current quorum's seconds on this rank
    events: tuple[MembershipEvent, ...]   # changes seen and not yet taken (:meth:`Membership.take_events`)
    healed_at: int | None                 # the step this node was healed to, not yet taken


@dataclass
class LiveRoundReport:
    """What one fault-tolerant round did, for the controller's counters: the phases of the attempt that
    counted (an overlapped round: its start), the round left in flight (applied at its step), and the
    failed attempts before it committed (counted with it; 0 for a round only started here)."""

    reports: list[RoundReport] = field(default_factory=list)
    in_flight: Round | None = None
    retries: int = 0
    retry_seconds: float = 0.0


class Membership:
    """Who is live, for one rank: see the module docstring. ``workers``: the run's workers (an elastic
    run's count is set again by :meth:`attach`)."""

    def __init__(self, cfg: RISGDConfig | None, workers: int):
        self.cfg = cfg
        self.workers = workers
        self.worker: int | None = None           # the manifest worker this node serves (fault-tolerant run)
        self.nodes: LiveNodes | None = None      # torchft's side (fault-tolerant run)
        self.accept: Callable[[frozenset[int]], str | None] | None = None
        self.over: Callable[[], str | None] | None = None  # why the run is over (the others finished it), or None
        self.events: list[MembershipEvent] = []
        self.healed_at: int | None = None
        self.quorum_seconds = 0.0                # every quorum's seconds on this rank, failed rounds' included
        self._members: frozenset[int] | None = None  # the last counted quorum's nodes

    # -- who is live ------------------------------------------------------------------------------
    def live_of_round(self, round_index: int, members: frozenset[int] | None = None) -> Live:
        """The workers taking part in round ``round_index``: the failure schedule's complement (of
        ``members``, the quorum's nodes, in a fault-tolerant run). The one place that decides who is
        live: the round, the stats, the trainer's coverage and run record all ask here."""
        down = failed_workers(self.cfg, round_index, self.workers)
        if members is None:
            return Live.without(down, self.workers)
        return Live(frozenset(members) - down, self.workers)

    def live_now(self, round_index: int) -> Live:
        """:meth:`live_of_round` of the last quorum's nodes (all workers outside a fault-tolerant run)."""
        return self.live_of_round(round_index, self._members)

    def members(self) -> frozenset[int]:
        """The workers whose nodes run now: the last quorum's (a fault-tolerant run), else all of them."""
        if self._members is not None:
            return self._members
        if self.nodes is not None:
            return frozenset({self.worker})
        return frozenset(range(self.workers))

    def live_workers(self, rounds: int) -> frozenset[int]:
        """The workers that took part in the last of ``rounds`` rounds (before the first: those of the
        first): :meth:`members` less those the ``failures`` schedule marks down."""
        if self.cfg is None:
            return frozenset(range(self.workers))
        return self.live_now(max(rounds - 1, 0)).workers

    def view(self, rounds: int) -> MembershipView:
        """A frozen copy of the membership after ``rounds`` rounds, for the trainer."""
        q = self.nodes.current if self.nodes is not None else None
        return MembershipView(self.workers, self.members(), self.live_workers(rounds),
                              q.quorum_id if q is not None else None, bool(q is not None and q.healing),
                              q.seconds if q is not None else 0.0, tuple(copy.deepcopy(self.events)),
                              self.healed_at)

    def take_healed(self) -> int | None:
        """The step this node was healed to since the last call (None: it was not)."""
        healed, self.healed_at = self.healed_at, None
        return healed

    def take_events(self) -> list[MembershipEvent]:
        """The membership changes seen since the last call."""
        events, self.events = self.events, []
        return events

    # -- the floor ----------------------------------------------------------------------------------
    def below_floor(self, members: frozenset[int]) -> str | None:
        """Why ``members`` cannot make a round (None: they can): fewer than ``min_nodes``, or what the
        caller's ``accept`` says (e.g. the data they hold). The run's only floor check."""
        if len(members) < self.cfg.min_nodes:
            return (f"{len(members)} live node(s) {sorted(members)}, fewer than min_nodes={self.cfg.min_nodes} "
                    "(bring a node back, or lower risgd.min_nodes)")
        return self.accept(members) if self.accept is not None else None

    # -- a fault-tolerant run -----------------------------------------------------------------------
    def attach(self, nodes: LiveNodes, worker: int, workers: int,
               accept: Callable[[frozenset[int]], str | None] | None = None,
               over: Callable[[], str | None] | None = None) -> None:
        """This node serves manifest worker ``worker`` of ``workers`` (:meth:`check_failures` first);
        ``nodes``: its torchft side. ``over()``: None, or the one line saying the run is over (the other nodes
        finished it while this one was away), asked by :meth:`check_over`."""
        self.nodes, self.worker, self.workers, self.accept, self.over = nodes, worker, workers, accept, over

    def check_over(self, q: Quorum) -> None:
        """:class:`RunOver` if the run is over (the caller's ``over``), asked at a quorum short of the run's
        nodes that differs from the last one (or below the floor, at each try): a node back from a freeze or a
        partition after the others finished stops at once, before it trains or writes a stale step."""
        if self.over is None or q.healing or len(q.members) >= self.workers:
            return
        why = self.over()
        if why is not None:
            raise RunOver(why)

    def check_failures(self, workers: int) -> None:
        """The ``failures`` schedule names nodes of the ``workers`` only (ValueError otherwise)."""
        failures = self.cfg.failures
        bad = sorted({r for f in failures for r in getattr(f, "ranks", ())} - set(range(workers)))
        if bad or any(getattr(f, "count", 0) >= workers for f in failures):
            raise ValueError(f"risgd.failures name node(s) {bad or 'more than exist'} of the {workers} workers")

    def quorum(self, step: int, behind: bool = False) -> Quorum:
        """The next quorum, with this node at ``step`` (a node behind the others is healed). ``behind``:
        this node resends a round whose commit failed here: it counts one step behind, so that a node whose
        commit succeeded (it applied the round and, under overlap, may start the next round at this very
        step) heals it, instead of both sending rounds from two anchors at one torchft step."""
        q = self.nodes.quorum(step - (1 if behind else 0))
        self.quorum_seconds += q.seconds
        if q.restarted and self._members is not None and not q.healing:
            q = self._rejoin(q, step, behind)
        return q

    def _rejoin(self, q: Quorum, step: int, behind: bool) -> Quorum:
        """The first quorum of a lighthouse started again: it knows only the nodes that reached it first (each
        node's torchft manager connects to it again on its own, within seconds of the others), and would make
        the others joiners, healed from a peer a round later. The quorum is asked again, as a start does, until
        it holds the last quorum's nodes, for up to :data:`~risgd_ext.live.LIGHTHOUSE_REJOIN_S` (a node lost
        during the outage is not waited for longer)."""
        t0 = time.perf_counter() - q.seconds
        deadline = time.perf_counter() + min(LIGHTHOUSE_REJOIN_S, self.cfg.floor_wait_s)
        while not q.healing and not self._members <= q.members and time.perf_counter() < deadline:
            time.sleep(0.1)
            q = self.nodes.quorum(step - (1 if behind else 0))
            self.quorum_seconds += q.seconds
        return dataclasses.replace(q, seconds=time.perf_counter() - t0)

    def meet(self, step: int) -> Quorum:
        """The first quorum of this node. A start (a fresh one, or the whole run resumed from a checkpoint)
        waits for all the nodes, or for the floor at most ``floor_wait_s``: the lighthouse forms a quorum of
        whichever nodes already run, and the later ones would all be healed. A node behind live ones is healed
        at once (the run is going on without it)."""
        cfg = self.cfg
        q = self.quorum(step)
        self.check_over(q)
        deadline = time.perf_counter() + cfg.floor_wait_s
        while (not q.healing and len(q.members) < self.workers
               and (time.perf_counter() < deadline or self.below_floor(q.members))):
            if time.perf_counter() > deadline:
                raise BelowFloor(f"below the floor at the start for floor_wait_s={cfg.floor_wait_s:g} s: "
                                 f"{self.below_floor(q.members)}")
            time.sleep(0.1)
            q = self.quorum(step)
            self.check_over(q)
        if not q.healing:
            self._members = q.members
        return q

    def leave(self) -> None:
        """This node leaves the live nodes (torchft's manager shut down)."""
        if self.nodes is not None:
            self.nodes.shutdown()

    def _note(self, q: Quorum, round_index: int, attempts: int, failed_seconds: float) -> None:
        """A membership event when the quorum's nodes differ from the last round's."""
        if q.members == self._members and not q.healing:
            return
        before = self._members if self._members is not None else q.members
        self.events.append(MembershipEvent(round_index, q.quorum_id, sorted(q.members), sorted(before - q.members),
                                           sorted(q.members - before), q.healing, q.seconds, attempts,
                                           failed_seconds))
        self._members = q.members

    def live_round(self, averaging: Averaging, position: Callable[[], tuple[int, int]], q: Quorum | None = None,
                   resend: Round | None = None, join: bool = False, blocking: bool = False,
                   hold: bool = False) -> LiveRoundReport:
        """One round among the live nodes, retried among the survivors until it commits; with ``overlap``
        (and no ``resend``) only started here (returned in flight). ``position()``: this rank's optimizer step
        and round now (asked at each attempt: a failed heal's vote has loaded the peer's). Below the floor it
        waits for a node to come back, up to ``floor_wait_s``. ``hold``: a resend committed before its apply
        step (its failure was seen early, by an evaluation or a checkpoint) is returned in flight, complete,
        until that step. The controller adds the report to its counters."""
        cfg, live_nodes, reducer = self.cfg, self.nodes, averaging.reducer
        attempts, failed_seconds, below_since = 0, 0.0, None
        copy_held = False  # a heal whose round failed: torchft loaded the peer's state at the vote all the same
        while True:
            t_attempt = time.perf_counter()
            step, round_index = position()
            q = q or self.quorum(step, behind=resend is not None)
            why = None if q.healing else self.below_floor(q.members)
            if why is not None or q.members != self._members:  # the others may have finished the run meanwhile
                self.check_over(q)
            if why is not None:
                below_since = below_since or time.perf_counter()
                if time.perf_counter() - below_since > cfg.floor_wait_s:
                    raise BelowFloor(f"below the floor for floor_wait_s={cfg.floor_wait_s:g} s: {why}")
                time.sleep(0.2)
                q = None
                continue
            self._note(q, round_index, attempts, failed_seconds)
            live = self.live_of_round(round_index, q.members)
            # a node holding a copy of its peer (its heal's round failed) contributes nothing until it has taken
            # an average: its model is the peer's progress, which would count twice
            here = not q.healing and not copy_held and self.worker in live.workers
            # a joiner runs an overlapped round as its peers do (the same collectives in the same order), but
            # waits for it at once: it has no progress of its own to keep, so it takes the average exactly
            background = cfg.overlap and resend is None and not blocking
            # a warm-up step's round makes the nodes one synchronous model: plain averaging, never the outer step
            r = averaging.round(live, apply_step=step + cfg.delay if background else None, live_here=here,
                                counted=True, resend=resend, plain=step <= cfg.warmup_sync_steps)
            if q.healing or copy_held:  # this node takes the live state at the commit, then the average itself: no
                r.applies = REPLACE  # progress of its own to keep (its model is the peer's by then)
            saved = reducer.save_residuals()
            reports = []
            try:
                reports.append(r.start())
                # waited for at its step (the controller's apply), where a failure is retried; a joiner, or a
                # node healed here, waits at once (the live state it takes is the peers' at this quorum)
                if background and not join and not q.healing and not copy_held:
                    r.saved_residuals = saved  # put back if it fails: its resend encodes d + the residual before
                    return LiveRoundReport(reports, in_flight=r)
                reports.append(r.wait())
            except AnchorsDiffer:  # every contributor sees the same sums: all stop, with one line
                raise
            except Exception as e:  # a peer gone or silent (gloo's error or its timeout): not committed
                live_nodes.report_error(e)
            if live_nodes.commit():  # a joiner's live state is loaded here, before the average is applied
                held = None
                if hold and not q.healing:  # committed ahead of its apply step: applied there
                    r.committed, held = True, r
                else:
                    reports.append(r.apply())
                return LiveRoundReport(reports, held, attempts, failed_seconds)
            reducer.restore_residuals(saved)
            copy_held = copy_held or (q.healing and self.healed_at is not None)
            attempts += 1
            failed_seconds += time.perf_counter() - t_attempt
            q = None
