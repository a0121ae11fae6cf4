"""A round's deadline: a slow worker is left out of a round when the others cover the data.

With ``deadline_margin: m > 0`` every round ends with a vote before its average: one all-reduce of
``2 * workers`` numbers, each worker's "late" flag and the seconds its round's local steps took
(late: projected to the whole round). Every rank receives the same vector, so every rank derives the
same deadline for the next round without another message:

    deadline = (1 + m) * median over the last ``WINDOW`` rounds of (the median over workers of their seconds)

A worker whose next step would end past the deadline votes at once, in the middle of its round; the
others vote when their local steps are done (at the round's step). The vote tells everyone who is
late. When the workers on time are accepted (``accept(on_time)`` is None: the trainer's check that
they hold ``elastic.min_coverage`` of the data and meet ``elastic.min_workers``), the late workers
skip the rest of the round's steps (no forward, no backward: :meth:`RISGDEngine.skip_step`) and take
part in its average with weight 0, as a failed worker does; they take the average and go on. When
they are not accepted (their data would be missing from the round), they finish their steps and the
round waits for them, as it does without a deadline.

The on-time workers wait in the vote until the late ones arrive, at most about the deadline, so a
worker at a third of the others' speed costs them ``m`` of a round, not two rounds. The median over
workers ignores a minority of slow ones; the window follows a change of pace within a few rounds.
The first round after a start or a resume has no deadline (no times yet).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

WINDOW = 5  # rounds whose times set the next deadline


@dataclass(frozen=True)
class Vote:
    """What one round's vote decided: who was late, who of them is left out (skips the rest of the round), the
    deadline the round ran under."""

    late: frozenset[int]
    left_out: frozenset[int]    # the late workers that skip their remaining steps; the others are waited for
    deadline: float | None      # seconds (None: no deadline yet)
    seconds: tuple[float, ...]  # each worker's seconds of local steps in the round (late: projected)
    refused: str | None = None  # why (some) late workers were waited for: the others alone were not accepted

    @property
    def skip(self) -> bool:
        return bool(self.left_out)


class Deadline:
    """One rank's side of the deadline (node_size 1: a rank is a worker)."""

    def __init__(self, margin: float, workers: int, worker: int, group=None):
        self.margin, self.workers, self.worker, self.group = margin, workers, worker, group
        self.history: deque[float] = deque(maxlen=WINDOW)
        self.accept: Callable[[frozenset[int]], str | None] | None = None
        self.started: float | None = None   # the round's first local step began
        self.voted: Vote | None = None      # this round's vote, once taken
        self.skipping = False               # this worker skips the rest of the round's steps
        self.clock: Callable[[], float] = time.perf_counter  # seconds (the composition matrix scripts its own)

    @property
    def deadline(self) -> float | None:
        if not self.history:
            return None
        return (1.0 + self.margin) * statistics.median(self.history)

    def step_started(self) -> None:
        """A local step begins (its forward): the round's clock starts at its first."""
        if self.started is None:
            self.started = self.clock()

    def elapsed(self) -> float:
        return 0.0 if self.started is None else self.clock() - self.started

    def late_now(self, steps_done: int, steps_left: int) -> bool:
        """After a local step: whether this worker's next step would end past the deadline (its steps taken at
        their mean pace this round), so it votes now. Never on the round's last step (it votes there anyway)."""
        deadline = self.deadline
        if deadline is None or self.voted is not None or steps_left <= 0 or steps_done <= 0:
            return False
        busy = self.elapsed()
        return busy + busy / steps_done > deadline

    def vote(self, late: bool, steps_done: int, steps_in_round: int, device: torch.device,
             members: frozenset[int] | None = None) -> Vote:
        """This round's vote (a collective: every rank calls it once per round). ``members``: the workers live in
        the round (the failure schedule's), of which those on time must be accepted for the late ones to skip."""
        busy = self.elapsed()
        seconds = busy * steps_in_round / max(steps_done, 1) if late else busy
        v = torch.zeros(2 * self.workers, dtype=torch.float64, device=device)
        v[self.worker] = 1.0 if late else 0.0
        v[self.workers + self.worker] = seconds
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(v, group=self.group)
        got = v.cpu().tolist()
        late_set = frozenset(w for w in range(self.workers) if got[w] > 0.5)
        times = tuple(got[self.workers:])
        deadline = self.deadline
        left_out, refused = self.leave_out(late_set, times, members)
        self.voted = Vote(late_set, left_out, deadline, times, refused)
        self.skipping = self.worker in left_out
        self.history.append(statistics.median(times))
        return self.voted

    def leave_out(self, late: frozenset[int], seconds: tuple[float, ...],
                  members: frozenset[int] | None = None) -> tuple[frozenset[int], str | None]:
        """Which late workers to leave out, from the vote (every rank decides the same). The workers on time are
        kept; the late are added back, the least late first, while the kept are not accepted (``accept``: the
        trainer's data check; nobody kept: "every worker was late") or while the next one is within the margin of
        this round's median pace (late only because the whole round was slow, not a straggler). Returns the rest,
        and why a late worker was waited for when the others alone were not accepted."""
        live = frozenset(range(self.workers)) if members is None else members
        late = late & live
        if not late:
            return frozenset(), None
        limit = (1.0 + self.margin) * statistics.median(seconds[w] for w in live)
        keep, back = set(live - late), sorted(late, key=lambda w: (seconds[w], w))
        refused = None

        def why() -> str | None:
            if not keep:
                return "every worker was late"
            return self.accept(frozenset(keep)) if self.accept is not None else None

        while back and ((reason := why()) is not None or seconds[back[0]] <= limit):
            refused = reason or refused
            keep.add(back.pop(0))
        if (reason := why()) is not None:
            return frozenset(), reason
        return frozenset(back), refused

    def round_done(self) -> Vote | None:
        """The round closed: the next one starts its clock at its first step. Returns its vote."""
        voted, self.voted, self.started, self.skipping = self.voted, None, None, False
        return voted
