"""The RI-SGD / local-SGD schedule on top of a DeepSpeed engine, and its accounting.

The controller decides, after each optimizer step, whether the next step all-reduces gradients
(warm-up), runs locally, closes a round, or averages inside each node only. It keeps the counters
that train.py logs and that a checkpoint must carry. What a round does is the round's business
(:mod:`risgd_ext.round`); the controller says when, over which live workers, and adds up the
reports the round's phases return.

One step with ``overlap`` (tau=4, delay 4), from ``engine.step()`` to the applied average:

1. ``engine.step()`` takes the optimizer step and calls :meth:`RISGDController.after_optimizer_step`.
2. At step 8 the round started at step 4 is due (``in_flight.apply_step == 8``): ``wait()`` (the
   seconds it blocks are ``comm_wait_seconds``), then ``apply()``: ``x <- x̄ + (x - x_sent)`` and
   ``a <- x̄`` (:meth:`_apply_pending`).
3. Step 8 also closes a round (``cfg.is_average_step``): :meth:`average` asks the membership
   (:class:`~risgd_ext.membership.Membership`, who is live) for the live workers, makes
   ``averaging.round(live, apply_step=8 + 4)``, and its ``start()`` copies ``x``, fills ``x - a`` and
   launches the cross-node all-reduces.
4. Steps 9-11 are local; the sum travels behind them. At step 12, back to 2.

Every phase returns a ``RoundReport``, added to the counters by :meth:`_account`; a fault-tolerant round
(run by the membership: quorum, floor, retries) returns a ``LiveRoundReport`` of them. ``averaged()``
at step 8 would ``wait()`` early (``view_wait_seconds``) and show ``x̄`` through ``viewed()``,
putting the local model back afterwards.
"""

from __future__ import annotations

import atexit
import os
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from risgd_common.layout import Layout

from .codec import make_codec
from .config import RISGDConfig, check_world
from .deadline import Deadline, Vote
from .flat import FlatModel
from .live import AnchorsDiffer, LiveNodes, MembershipEvent, Quorum
from .membership import LiveRoundReport, Membership, MembershipView
from .reduce import GradientAverager, Traffic
from .round import Averaging, Live, NoFiniteContribution, Round, RoundReport
from .topology import NodeGroups, build_node_groups, inherit_world_timeout

# Counters carried by checkpoints, in the order stats() reports them.
_COUNTERS = (
    "steps", "sync_steps", "local_steps", "rounds", "steps_in_round", "bytes_allreduced",
    "comm_seconds", "average_seconds", "compute_seconds", "divergence", "divergence_sum",
    "live_ranks", "rounds_down",
)
# Added with the node level and overlap: a checkpoint written before them lacks these (0 then).
_COUNTERS_2 = ("intra_bytes", "intra_comm_seconds", "intra_collectives", "inter_collectives",
               "comm_wait_seconds", "view_wait_seconds", "non_finite_left_out", "non_finite_healed")
# Added with the deadline (risgd_ext.deadline): rounds that left late workers out, and those of them that left this
# worker out; rounds that waited for late workers (the others did not cover their data); steps this worker skipped
_COUNTERS_3 = ("late_rounds", "late_rounds_here", "late_waited", "steps_skipped")


_LIVE: weakref.WeakSet = weakref.WeakSet()  # controllers of this process, for the end-of-run check


def _check_all(when: str) -> None:
    for ctl in list(_LIVE):
        ctl.warn_unfinished(when)


def _watch_process_group() -> None:
    """Once per process: warn when the process group is destroyed, or the process exits, while a
    controller's ranks hold different models (a forgotten ``consensus()``)."""
    if getattr(dist.destroy_process_group, "_risgd_watched", False):
        return
    original = dist.destroy_process_group

    def destroy_process_group(*args, **kwargs):
        _check_all("the process group is destroyed")
        for ctl in list(_LIVE):  # no collective may outlive its group (gloo aborts the process at exit)
            ctl.settle()
        return original(*args, **kwargs)

    destroy_process_group._risgd_watched = True
    dist.destroy_process_group = destroy_process_group
    atexit.register(_check_all, "the process exits")


class RISGDController:
    """Local steps and periodic averaging for one rank. ``cfg=None`` means plain DeepSpeed: the
    controller then only accounts for DeepSpeed's own per-step gradient all-reduce."""

    def __init__(self, engine: Any, cfg: RISGDConfig | None):
        self.engine = engine
        self.cfg = cfg
        self._warned = False
        # The manifest worker this rank serves in an elastic run (set before load_checkpoint): its
        # state is saved and loaded by worker id, not rank. None: by rank, as in every fixed-size run.
        self.identity: int | None = None
        self.restored: str | None = None  # after load_checkpoint, elastic: "own" state or the "average"
        self.group = getattr(engine, "data_parallel_group", None)
        self.world_size = dist.get_world_size(self.group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        if dist.is_initialized():
            inherit_world_timeout(self.group)
        if cfg is not None:
            check_world(cfg, self.world_size)
        self.layout = Layout(self.world_size, cfg.node_size if cfg is not None else 1)
        self.node_size = self.layout.node_size
        self.worker = self.layout.worker_of(self.rank)  # with the node level, a worker is a node
        self.nodes: NodeGroups | None = None
        if cfg is not None and cfg.hierarchical:
            if self.world_size != dist.get_world_size():
                raise ValueError("node_size > 1 needs the data-parallel group to be the whole world")
            self.nodes = build_node_groups(self.layout, self.rank)
        self._accelerator = get_accelerator()
        self.averaging: Averaging | None = None
        self.in_flight: Round | None = None  # an overlapped round between its start and its apply
        self.steps = self.sync_steps = self.local_steps = 0
        self.rounds = self.steps_in_round = self.bytes_allreduced = 0
        self.comm_seconds = self.average_seconds = self.compute_seconds = 0.0
        self.divergence = self.divergence_sum = 0.0
        self.live_ranks = self.world_size
        self.down_ranks: frozenset[int] = frozenset()  # in the last round
        self.rounds_down = 0
        self.intra_bytes = self.intra_collectives = self.inter_collectives = 0
        # overlap: seconds steps waited for a round at its scheduled apply step (the network was slower
        # than the steps behind it), and seconds waited to look at an average early (averaged(),
        # consensus(), a checkpoint)
        self.intra_comm_seconds = self.comm_wait_seconds = self.view_wait_seconds = 0.0
        # contributions left out of rounds because they were not finite (seen by every rank), and the rounds
        # in which this rank's own was (it took the average; its optimizer state's non-finite values restart)
        self.non_finite_left_out = self.non_finite_healed = 0
        self.late_rounds = self.late_rounds_here = self.late_waited = self.steps_skipped = 0
        self._consensus_step = -1  # the step at which consensus() last averaged BatchNorm statistics
        # compute_seconds: each step from its forward to the end of its optimizer step, minus the
        # communication inside it. On a device whose work is done when the host call returns (the
        # CPU) two host clock reads per step measure it. On an asynchronous device (CUDA) the host
        # clock would only see kernel launches, and synchronising every step would stall the
        # pipeline: a pair of timing events is recorded instead, and read at the next point that
        # waits for the device anyway (a round, stats(), a checkpoint) or once 64 are pending.
        self._event_cls = None if self._accelerator.is_synchronized_device() else self._accelerator.Event
        self._step_started: Any = None  # perf_counter() or an event
        self._comm_in_step = 0.0
        self._pending: deque = deque()  # step timing events: (start event, end event, communication seconds inside)
        self._free_events: list = []
        engine.enable_backward_allreduce = self.next_step_is_sync()
        if cfg is not None:
            buffers = [b for b in engine.module.buffers() if b.is_floating_point()] if cfg.average_buffers else []
            # a node's ranks differ at a round when they average among themselves every tau_intra steps
            self.averaging = Averaging.build(self.params(), buffers, cfg.bucket_bytes, self.layout, self.rank,
                                             self.group, self.nodes, self.synchronize,
                                             node_sum=cfg.hierarchical and cfg.tau_intra > 0,
                                             measure_divergence=cfg.measure_divergence,
                                             outer=(cfg.outer_lr, cfg.outer_momentum, cfg.outer_nesterov)
                                             if cfg.outer else None,
                                             codec=make_codec(cfg.compress), error_feedback=cfg.error_feedback)
        # who is live in each round (the failure schedule; with fault_tolerance=torchft, the quorum's nodes, the
        # changes seen, the step this node was healed to, the floor): the membership's alone. Here: the rounds
        # retried after a failure and the seconds they took
        self.membership = Membership(cfg, self.layout.workers)
        # deadline_margin > 0: a round closes without its late workers when the others cover the data
        self.deadline: Deadline | None = None
        if cfg is not None and cfg.deadline_margin > 0:
            self.deadline = Deadline(cfg.deadline_margin, self.layout.workers, self.worker, self.group)
        self.late_events: list[dict[str, Any]] = []  # rounds with late workers, for the run record
        self.retries = 0
        self.retry_seconds = 0.0
        self.grad_averager: GradientAverager | None = None
        if self.nodes is not None and cfg.tau_intra == 0:
            self.grad_averager = GradientAverager(self.params(), self.nodes.node_group, cfg.node_size,
                                                  cfg.bucket_bytes, self.synchronize)
        if cfg is not None:
            _LIVE.add(self)
            _watch_process_group()

    def unfinished(self) -> str | None:
        """Why the ranks may hold different models now (None: they hold the same average)."""
        if self.cfg is None or self.steps == 0:
            return None
        if self.in_flight is not None:
            return f"a round is in flight at step {self.steps} (overlap)"
        if not self.is_average():
            return f"step {self.steps} is inside a round"
        return None

    def settle(self) -> None:
        """Complete the round in flight, if any, without applying it (the process group is going
        away: its collective must finish first). Every rank launched it; a rank that cannot finish
        it fails after the group's timeout, as any collective would."""
        if self.in_flight is not None and not self.in_flight.complete:
            try:
                self.in_flight.wait()
            except RuntimeError as e:  # a peer already gone: nothing left to settle
                warnings.warn(f"risgd_ext: the round in flight could not complete ({e})", RuntimeWarning,
                              stacklevel=2)

    def warn_unfinished(self, when: str) -> None:
        """Warn once if ``when`` happens while the ranks hold different models."""
        reason = self.unfinished()
        if reason is None or self._warned:
            return
        self._warned = True
        warnings.warn(f"risgd_ext: {when} while {reason}: rank {self.rank} holds its local model, not the "
                      "average; call engine.risgd.consensus() on every rank at an averaging step "
                      "(engine.risgd.is_average()) before saving or ending", RuntimeWarning, stacklevel=3)

    @property
    def model(self) -> FlatModel | None:
        """The flat model the rounds average (None: plain DeepSpeed)."""
        return self.averaging.model if self.averaging is not None else None

    # -- what is averaged ---------------------------------------------------------------------
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def optimizer_state(self) -> list[torch.Tensor]:
        """Optimizer state shaped like the parameters (momentum, Adam moments), if averaged."""
        out: list[torch.Tensor] = []
        if self.cfg.average_optimizer_state:
            optimizer = self.engine.optimizer
            for p in self.params():
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.is_floating_point() and value.shape == p.shape:
                        out.append(value)
        return out

    # -- the schedule -------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.cfg is not None

    def next_step_is_sync(self) -> bool:
        return self.cfg is None or self.steps < self.cfg.warmup_sync_steps

    def is_average(self) -> bool:
        """True when every rank holds the same averaged parameters: after a synchronous step or
        at the end of a round. A training loop evaluates, logs and stops only here."""
        return self.cfg is None or self.cfg.is_average_step(self.steps)

    def consensus(self) -> dict[str, Any]:
        """Bring every rank to the same model for good and return the accounting (:meth:`stats`).

        Call it on every rank at the same step, where :meth:`is_average` holds, at the end of
        training (before saving the final model). Float buffers (BatchNorm statistics) that no round
        has averaged (plain DeepSpeed and warm-up steps never do) are averaged here, once per step.
        With ``overlap`` the round in flight is waited for and applied now: the ranks take its
        average (the trajectory after this point would differ from a run that did not call it, so
        evaluate mid-run inside :meth:`averaged` instead).
        """
        if not self.is_average():
            raise RuntimeError(f"consensus() at step {self.steps}, inside a round: the ranks hold different "
                               "models; call it where is_average() is true")
        if self.in_flight is not None:
            self._apply_pending(scheduled=False)
        # synchronous steps (plain DeepSpeed, warm-up) average gradients, never buffers
        sync_phase = self.cfg is None or not self.cfg.average_buffers or self.steps <= self.cfg.warmup_sync_steps
        if sync_phase and self._consensus_step != self.steps:
            self.average_buffers()
            self._consensus_step = self.steps
        return self.stats()

    @contextmanager
    def averaged(self) -> Iterator[dict[str, Any]]:
        """``with engine.risgd.averaged() as stats:`` every rank holds the averaged model inside (to
        evaluate it), and training goes on afterwards exactly as if nothing had been looked at.

        Without overlap this is :meth:`consensus`. With overlap the round that closed at this step
        is waited for (the only wait it adds) and shown through its ``viewed()``; the local model
        is put back after, and the average is applied at the step the schedule says.
        """
        if self.in_flight is None or not self.is_average():
            yield self.consensus()
            return
        self._wait_pending()
        if self.in_flight is None:  # a fault-tolerant resend that healed this node: it holds the average now
            yield self.stats()
            return
        with self.in_flight.viewed():
            yield self.stats()

    def synchronize(self) -> None:
        # Host timers only measure device work after a synchronize (a no-op on the CPU).
        self._accelerator.synchronize()

    def mark_step_start(self) -> None:
        """The first forward of a step (not micro-batch) starts its compute time."""
        if self.deadline is not None and not self.engine.enable_backward_allreduce:
            self.deadline.step_started()
        if self._step_started is None:
            if self._event_cls is None:
                self._step_started = time.perf_counter()
            else:
                self._step_started = self._event()
                self._step_started.record()

    def _event(self):
        return self._free_events.pop() if self._free_events else self._event_cls(enable_timing=True)

    def _end_step(self) -> None:
        started, comm = self._step_started, self._comm_in_step
        self._step_started, self._comm_in_step = None, 0.0
        if started is None:
            return
        if self._event_cls is None:
            self.compute_seconds += max(time.perf_counter() - started - comm, 0.0)
            return
        end = self._event()
        end.record()
        self._pending.append((started, end, comm))
        if len(self._pending) >= 64:
            self._collect_events(wait=False)

    def _collect_events(self, wait: bool) -> None:
        """Add the device time of finished steps to compute_seconds (all of them with ``wait``)."""
        while self._pending:
            start, end, comm = self._pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return
            self.compute_seconds += max(start.elapsed_time(end) / 1e3 - comm, 0.0)
            self._pending.popleft()
            self._free_events += (start, end)

    def record_gradient_allreduce(self, nbytes: int, seconds: float) -> None:
        self.bytes_allreduced += nbytes
        self.comm_seconds += seconds
        self._comm_in_step += seconds

    def after_optimizer_step(self) -> None:
        """Called once per optimizer step (not per micro-batch), after the update. A round with no finite
        contribution left (every worker's model NaN or inf) raises :class:`NoFiniteContribution` naming the
        step, on every rank alike (they all see the same count)."""
        try:
            self._after_optimizer_step()
        except NoFiniteContribution as e:
            raise NoFiniteContribution(f"step {self.steps}: {e}; no average to go on from") from None

    def _after_optimizer_step(self) -> None:
        engine = self.engine
        was_sync = engine.enable_backward_allreduce
        self.steps += 1
        self._end_step()  # the step's compute ends here; a round is accounted on its own
        if was_sync:
            self.sync_steps += 1
            if self.live is not None:  # DeepSpeed's gradient all-reduce spans this node only: the nodes' models
                t0 = time.perf_counter()  # are made one by a blocking round after every warm-up step
                self._live_round(blocking=True)
                self._round_done(self.membership.live_now(self.rounds), t0)
        else:
            self.local_steps += 1
            self.steps_in_round += 1
            if self.in_flight is not None and not self.in_flight.complete:
                self.in_flight.advance()  # a compressed round's second phase, once its first is done
            if self.in_flight is not None and self.in_flight.apply_step == self.steps:
                self._apply_pending(scheduled=True)
            if self.cfg.is_average_step(self.steps):
                self.average()
            elif self.cfg.is_intra_average_step(self.steps):
                traffic = Traffic()
                self.averaging.reducer.node_mean(traffic)
                self._account(RoundReport(traffic=traffic))
            elif self.deadline is not None and not self.deadline.skipping:
                left = self.cfg.average_steps_near(self.steps)[1] - self.steps
                if self.deadline.late_now(self.steps_in_round, left):  # the next step would end past the deadline
                    self._vote(late=True)
        if self.cfg is not None:
            if self.steps == self.cfg.warmup_sync_steps:
                # Post-local SGD: ranks are identical after synchronous steps; measure from here.
                self.model.set_anchor()
            sync = self.steps < self.cfg.warmup_sync_steps
            if sync != was_sync:  # the engine is an nn.Module: set the flag only when it changes
                engine.enable_backward_allreduce = sync

    @property
    def skipping(self) -> bool:
        """This worker was late at its round's deadline and the others cover its data: it skips the rest of the
        round's steps (the training loop calls ``engine.skip_step()`` instead of a forward, backward and step)
        and takes the round's average (:mod:`risgd_ext.deadline`)."""
        return self.deadline is not None and self.deadline.skipping

    def skipped_step(self) -> None:
        """A step skipped by a late worker (``engine.skip_step()``): on the schedule as a local step, no update."""
        if not self.skipping:
            raise RuntimeError(f"skip_step() at step {self.steps + 1}: this worker is not late at a deadline "
                               "(engine.risgd.skipping is false); take the step")
        self.steps_skipped += 1
        self.after_optimizer_step()

    def _vote(self, late: bool) -> Vote:
        """This round's deadline vote (every rank once per round: a late one mid-round, the others at the round)."""
        rounds_steps = self.cfg.tau
        t0 = time.perf_counter()
        members = self.membership.live_of_round(self.rounds).workers
        vote = self.deadline.vote(late, self.steps_in_round, rounds_steps, self.model.buffers[0].device, members)
        self.average_seconds += time.perf_counter() - t0
        return vote

    def live_of_round(self, round_index: int, members: frozenset[int] | None = None) -> Live:
        """The workers taking part in round ``round_index`` (:meth:`Membership.live_of_round`, the one place
        that decides who is live)."""
        return self.membership.live_of_round(round_index, members)

    def members(self) -> frozenset[int]:
        """The workers whose nodes run now: the last quorum's (a fault-tolerant run), else all of them."""
        return self.membership.members()

    def live_workers(self) -> frozenset[int]:
        """The workers that took part in the last round (before the first: those of the first):
        :meth:`members` less those the ``failures`` schedule marks down."""
        return self.membership.live_workers(self.rounds)

    def membership_view(self) -> MembershipView:
        """Who is live, as the trainer may read it: a frozen copy (members, live workers, the current quorum,
        the changes not yet taken)."""
        return self.membership.view(self.rounds)

    @property
    def live(self) -> LiveNodes | None:
        """The torchft side of a fault-tolerant run (built by :meth:`go_live`; None otherwise)."""
        return self.membership.nodes

    @property
    def total_workers(self) -> int:
        return self.membership.workers

    @property
    def healed_at(self) -> int | None:
        """The step this node was healed to, not yet taken (:meth:`take_healed`)."""
        return self.membership.healed_at

    @property
    def quorum_seconds(self) -> float:
        return self.membership.quorum_seconds

    # -- fault tolerance (torchft) -------------------------------------------------------------
    def go_live(self, worker: int, workers: int, accept=None, lighthouse: str | None = None,
                state: dict[str, tuple] | None = None, resume=None, over=None) -> bool:
        """Join the run's live nodes (``fault_tolerance: torchft``), as the node serving manifest
        worker ``worker`` of ``workers``: every rank of the node calls it once, after the engine is
        built (and a checkpoint, if any, loaded). ``accept(members)``: None, or why those nodes are
        below the run's floor (e.g. the data they hold). Returns whether this node was healed: it
        joined a run in progress, took part in its current round and now holds its live state
        (:attr:`healed_at`: the step it is at). ``state``: name -> (load, save) of more state a joiner
        takes from its peer (the training loop's: its step, the learning-rate schedule). ``resume()``:
        called when this node is not behind live ones (a start of the whole run), before its first
        round, to load the run's checkpoint; a node healed from a peer never calls it (it would read a
        file, and one written while it was away holds no state of its own). ``over()``: None, or the one line
        saying the run is over (the other nodes finished it): :class:`~risgd_ext.live.RunOver` is raised with it
        at a quorum short of the run's nodes (:meth:`Membership.check_over`)."""
        cfg = self.cfg
        if cfg is None or not cfg.live:
            raise RuntimeError("go_live() needs the risgd block's fault_tolerance: torchft")
        self.membership.check_failures(workers)
        self.identity = worker
        store = (os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")))
        nodes = LiveNodes(worker, self.layout.local_of(self.rank), self.node_size, store, cfg.op_timeout_s,
                          cfg.quorum_timeout_s, lighthouse)
        self.membership.attach(nodes, worker, workers, accept, over)
        nodes.register_state("risgd", self._load_live_state, self._live_state)
        for name, (load, save) in (state or {}).items():
            nodes.register_state(name, load, save)
        self.averaging.worker = worker
        self.averaging.reducer.cross = nodes
        q = self.membership.meet(self.steps)
        if not q.healing:
            if resume is not None:
                resume()
            warming = 0 < self.steps <= cfg.warmup_sync_steps and self.rounds < self.steps  # a warm-up step's round
            if warming or (self.steps_in_round and cfg.is_average_step(self.steps)):
                # resumed from a checkpoint written where a round was due but could not be formed (the lighthouse
                # was lost at its quorum): that round first, among the nodes resumed with it, as it would have been
                t0 = time.perf_counter()
                self._live_round(q, blocking=warming)
                self._round_done(self.membership.live_now(self.rounds), t0)
            return False
        # the live nodes are at a round: take part in it (contributing nothing, blocking even if theirs is
        # overlapped: the same collectives), take the live state at its commit, then its average
        t0 = time.perf_counter()
        self._live_round(q, join=True)
        self._round_done(self.membership.live_now(self.rounds), t0)
        return True

    def _live_state(self) -> dict[str, Any]:
        """What a joiner receives from the live peer of its place (in torchft's quorum thread, while
        this rank waits for the quorum: nothing changes it meanwhile)."""
        state = self.state_dict()
        for own in ("residual", "server_residual", "pending"):  # this rank's, not the joiner's
            state.pop(own, None)
        return {"controller": state, "module": self.engine.module.state_dict(),
                "optimizer": self.engine.optimizer.state_dict()}

    def _load_live_state(self, state: dict[str, Any]) -> None:
        self.engine.module.load_state_dict(state["module"])
        self.engine.optimizer.load_state_dict(state["optimizer"])
        self.load_state_dict(state["controller"])
        self.membership.healed_at = self.steps

    def _live_round(self, q: Quorum | None = None, resend: Round | None = None, join: bool = False,
                    blocking: bool = False, hold: bool = False) -> None:
        """One round among the live nodes (:meth:`Membership.live_round`: quorum, floor, retries until it
        commits), added to the counters here; a round it leaves in flight is this controller's to apply."""
        report = self.membership.live_round(self.averaging, lambda: (self.steps, self.rounds), q, resend, join,
                                            blocking, hold)
        self._account_live(report)

    def _account_live(self, report: LiveRoundReport) -> None:
        if report.in_flight is not None:
            self.in_flight = report.in_flight
        for phase in report.reports:
            self._account(phase)
        self.retries += report.retries
        self.retry_seconds += report.retry_seconds

    def take_healed(self) -> int | None:
        """The step this node was healed to since the last call (None: it was not). A node behind the others
        at a round (its commit failed where theirs succeeded, or it joined) takes their live state, step
        included: the training loop goes on from this step (its data position too)."""
        return self.membership.take_healed()

    def take_events(self) -> list[MembershipEvent]:
        """The membership changes seen since the last call (for the run record)."""
        return self.membership.take_events()

    def average(self) -> None:
        """One averaging round over the live workers (across nodes with the node level): blocking,
        or with ``overlap`` started in the background and applied ``delay`` steps later."""
        cfg = self.cfg
        if self.live is not None:
            if self.in_flight is not None:
                raise RuntimeError("a round is still in flight: apply it before starting the next")
            t0 = time.perf_counter()
            self._live_round()
            self._round_done(self.membership.live_now(self.rounds), t0)
            return
        live = self.membership.live_of_round(self.rounds)
        t0 = time.perf_counter()
        if self.deadline is not None:  # the workers late at the deadline take part with weight 0, as failed ones
            vote = self.deadline.voted or self._vote(late=False)
            if vote.skip:
                live = Live(live.workers - vote.left_out, live.total)
        if cfg.overlap:
            if self.in_flight is not None:
                raise RuntimeError("a round is still in flight: apply it before starting the next")
            self.in_flight = self.averaging.round(live, apply_step=self.steps + cfg.delay)
            self._account(self.in_flight.start())
        else:
            r = self.averaging.round(live)
            for report in (r.start(self.optimizer_state()), r.wait(), r.apply()):
                self._account(report)
        self._round_done(live, t0)

    def _round_done(self, live: Live, t0: float) -> None:
        self.average_seconds += time.perf_counter() - t0
        if self.deadline is not None:
            self._late_done(self.deadline.round_done())
        self.live_ranks = len(live.workers) * self.node_size
        if self.live is None:
            self.down_ranks = frozenset(self.layout.ranks_of_workers(live.down))
        self.rounds_down += 0 if self.averaging.worker in live.workers else 1
        self.rounds += 1
        self.steps_in_round = 0
        self._collect_events(wait=False)  # the round waited for the device: read the steps' events

    def _late_done(self, vote: Vote | None) -> None:
        """Account for a round's deadline vote, and keep a round with late workers for the run record."""
        if vote is None or not vote.late:
            return
        if vote.skip:
            self.late_rounds += 1
            self.late_rounds_here += self.averaging.worker in vote.left_out
        if vote.late - vote.left_out:
            self.late_waited += 1
        self.late_events.append({"step": self.steps, "event": "late", "late_workers": sorted(vote.late),
                                 "left_out_workers": sorted(vote.left_out), "left_out": vote.skip,
                                 "deadline_s": vote.deadline, "round_seconds": [round(s, 4) for s in vote.seconds],
                                 "waited_because": vote.refused})

    def take_late_events(self) -> list[dict[str, Any]]:
        """The rounds with late workers since the last call (for the run record): the step, who was late, who of
        them was left out (the others were waited for, and why), the deadline and each worker's seconds."""
        events, self.late_events = self.late_events, []
        return events

    def _account(self, report: RoundReport, scheduled: bool = False) -> None:
        """Add what one phase of a round (or an intra-node average) reported to the counters."""
        self.bytes_allreduced += report.bytes_sent
        self.comm_seconds += report.comm_seconds
        if scheduled:
            self.comm_wait_seconds += report.waited
        else:
            self.view_wait_seconds += report.waited
        t = report.traffic
        self.intra_bytes += t.intra_bytes
        self.intra_comm_seconds += t.intra_seconds
        self.intra_collectives += t.intra_collectives
        self.inter_collectives += t.inter_collectives
        if report.divergence is not None:
            self.divergence = report.divergence
            self.divergence_sum += report.divergence
        if report.left_out:
            self.non_finite_left_out += report.left_out
            if self.rank == 0:
                warnings.warn(f"risgd_ext: step {self.steps}: {report.left_out} non-finite contribution(s) (NaN or "
                              "inf) left out of the round; the others' average goes on", RuntimeWarning, stacklevel=2)
        if report.healed:
            self.non_finite_healed += 1
            self._heal_optimizer_state()
            warnings.warn(f"risgd_ext: step {self.steps}: worker {self.averaging.worker} (rank {self.rank}) held a "
                          "non-finite model; it was left out of the round and took the average", RuntimeWarning,
                          stacklevel=2)

    def _heal_optimizer_state(self) -> None:
        """A worker healed from a non-finite model: its optimizer state's non-finite values (momentum built
        from NaN gradients) restart from zero, or the next step would bring the NaN back."""
        for state in self.engine.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.is_floating_point():
                    value.masked_fill_(~torch.isfinite(value), 0.0)

    def _wait_pending(self, scheduled: bool = False) -> None:
        """Wait for the round in flight; ``scheduled``: at its apply step (a wait the schedule
        makes the steps pay), else to look at its average early. A fault-tolerant run that looks early (an
        evaluation, a checkpoint) and finds the round failed resends it among the survivors now, and holds
        it, committed, until its apply step."""
        r = self.in_flight
        if r is None or r.complete:
            return
        if self.live is None or scheduled:
            self._account(r.wait(), scheduled)
            return
        t0 = time.perf_counter()
        if not self._waited_live(r, scheduled):
            self._resend(r, t0, hold=True)

    def _waited_live(self, r: Round, scheduled: bool) -> bool:
        """Wait for a fault-tolerant overlapped round; False when it failed (a peer gone or silent)."""
        try:
            self._account(r.wait(), scheduled)
            return True
        except AnchorsDiffer:
            raise
        except Exception as e:
            self.live.report_error(e)
            return False

    def _resend(self, r: Round, t0: float, hold: bool = False) -> None:
        """Send a failed overlapped round again among the survivors, from the residuals it started from (its
        failed send's encoding is not what counts); applied at once, or ``hold``: kept until its step."""
        self.in_flight = None
        self.retries += 1
        self.retry_seconds += time.perf_counter() - t0
        self.averaging.reducer.restore_residuals(r.saved_residuals)
        self._live_round(resend=r, hold=hold)

    def _apply_pending(self, scheduled: bool) -> None:
        t0 = time.perf_counter()
        if self.live is not None:  # fault-tolerant: commit, or send it again among the survivors
            r = self.in_flight
            # a resend committed when an early look found its first send failed, or a round that commits now
            if r.committed or ((r.complete or self._waited_live(r, scheduled)) and self.live.commit()):
                self.in_flight = None
                self._account(r.apply())
            else:
                self._resend(r, t0)
            self.average_seconds += time.perf_counter() - t0
            return
        self._wait_pending(scheduled)
        self._account(self.in_flight.apply())
        self.in_flight = None
        self.average_seconds += time.perf_counter() - t0

    def node_gradients_due(self) -> bool:
        """Whether this optimizer step all-reduces gradients inside the node (a local step with a
        synchronous node level); the engine calls :meth:`reduce_node_gradients` before it updates."""
        return self.grad_averager is not None and not self.engine.enable_backward_allreduce

    def reduce_node_gradients(self) -> None:
        t0 = time.perf_counter()
        nbytes, collectives = self.grad_averager.reduce()
        self.synchronize()
        seconds = time.perf_counter() - t0
        self.intra_bytes += nbytes
        self.intra_collectives += collectives
        self.intra_comm_seconds += seconds
        self._comm_in_step += seconds

    def average_buffers(self) -> None:
        """Average the floating-point buffers (BatchNorm statistics) over all ranks, once.

        Plain DeepSpeed never synchronises buffers, so with non-iid data rank 0's BatchNorm
        statistics describe only its own chunk; call this before evaluating a synchronous run.
        (With a 'risgd' block, buffers are averaged every round already.)
        """
        buffers = [b for b in self.engine.module.buffers() if b.is_floating_point()]
        if not buffers or self.world_size == 1:
            return
        flat = torch.cat([b.detach().flatten() for b in buffers])
        self.synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(flat, group=self.group)
        self.synchronize()
        self.comm_seconds += time.perf_counter() - t0
        self.bytes_allreduced += flat.numel() * flat.element_size()
        flat.div_(self.world_size)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    # -- reporting and checkpoints ------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Accounting on this rank, as a plain dict (docs/engine.md has a table of the keys). On an
        asynchronous device this waits for the steps queued so far, to count their compute."""
        self._collect_events(wait=True)
        out: dict[str, Any] = {k: getattr(self, k) for k in _COUNTERS}
        out["comm_rounds"] = self.sync_steps + self.rounds
        out["divergence_mean"] = self.divergence_sum / self.rounds if self.rounds else 0.0
        for k in _COUNTERS_2 + _COUNTERS_3:
            out[k] = getattr(self, k)
        out["deadline_margin"] = self.cfg.deadline_margin if self.cfg else 0.0
        out["deadline_s"] = self.deadline.deadline if self.deadline is not None else None
        out["world_size"] = self.world_size
        out["tau"] = self.cfg.tau if self.cfg else 1
        out["node_size"] = self.node_size
        out["workers"] = self.layout.workers
        out["tau_intra"] = self.cfg.tau_intra if self.cfg else 0
        out["overlap"] = bool(self.cfg and self.cfg.overlap)
        out["overlap_delay"] = self.cfg.delay if self.cfg and self.cfg.overlap else 0
        out["model_bytes"] = sum(b.numel() * b.element_size() for b in self.model.buffers) if self.model else 0
        out["compress"] = self.cfg.compress if self.cfg else "none"
        out["error_feedback"] = bool(self.cfg and self.cfg.compress != "none" and self.cfg.error_feedback)
        out["outer_lr"] = self.cfg.outer_lr if self.cfg else 1.0
        out["outer_momentum"] = self.cfg.outer_momentum if self.cfg else 0.0
        out["outer_nesterov"] = bool(self.cfg and self.cfg.outer_nesterov)
        # who was down in the last round: a pure function of the schedule, so it survives a resume
        last = self.rounds - 1
        down = self.membership.live_of_round(last).down if self.cfg and last >= 0 else frozenset()
        out["fault_tolerance"] = self.cfg.fault_tolerance if self.cfg else "none"
        out["retries"], out["retry_seconds"], out["quorum_seconds"] = self.retries, self.retry_seconds, \
            self.quorum_seconds
        out["down_workers"] = sorted(down)
        out["down_ranks"] = self.layout.ranks_of_workers(down)
        return out

    def state_dict(self) -> dict[str, Any]:
        self._collect_events(wait=True)
        self._wait_pending()  # a round in flight is saved complete: its sums, not a promise
        state: dict[str, Any] = {k: getattr(self, k) for k in _COUNTERS + _COUNTERS_2 + _COUNTERS_3}
        state["consensus_step"] = self._consensus_step
        state["anchors"] = [a.detach().cpu() for a in self.model.anchors] if self.model else []
        state["pending"] = self.in_flight.state_dict() if self.in_flight is not None else None
        model, reducer = self.model, self.averaging.reducer if self.averaging else None
        if model is not None and model.outer is not None:  # the outer step's momentum buffers
            state["outer"] = model.outer.state_dict()
        if reducer is not None and reducer.residual is not None:  # error feedback's residuals: this rank's
            state["residual"] = [r.detach().cpu() for r in reducer.residual]
        if reducer is not None and reducer.server_state() is not None:  # ... and its chunks' owner's
            state["server_residual"] = reducer.server_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in _COUNTERS:
            setattr(self, k, state[k])
        for k in _COUNTERS_2 + _COUNTERS_3:
            setattr(self, k, state.get(k, 0))
        self._consensus_step = state.get("consensus_step", -1)
        saved_round = state.get("pending")
        self.in_flight = None
        if self.averaging is not None and saved_round is not None:
            self.in_flight = Round.from_state(self.averaging, saved_round)
        self._pending.clear()
        self._step_started, self._comm_in_step = None, 0.0
        if self.model is not None:
            for mine, saved in zip(self.model.anchors, state["anchors"]):
                mine.copy_(saved)
            if self.model.outer is not None and "outer" in state:
                self.model.outer.load_state_dict(state["outer"])
            reducer = self.averaging.reducer
            reducer.residual = None
            if reducer.codec is not None and "residual" in state:
                reducer.residual = [saved.to(f.buffer.device).clone() for saved, f in
                                    zip(state["residual"], self.model.flats)]
            reducer.load_server_state(state.get("server_residual") if reducer.codec is not None else None)
        self.engine.enable_backward_allreduce = self.next_step_is_sync()
