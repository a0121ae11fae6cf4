"""Where a run stands (:class:`Progress`) and where it is kept (:class:`Checkpoints`, the run's ``checkpoints/``).

A :class:`Progress` is what the trainer goes on from: a checkpoint's, or a live peer's when an elastic
node is healed (``risgd_trainer.elastic``). It is a value, handed over and returned, never shared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from risgd_trainer.agree import agree


@dataclass(frozen=True)
class Progress:
    """Where a run stands at ``step``: the best test accuracy so far, the step of the last evaluation, the wall
    seconds trained, this worker's data position (``cursor``: from its own checkpoint; None: the loader draws
    from the step alone) and the learning-rate schedule's state (``scheduler``: from a live peer at a heal; a
    checkpoint restores the schedule with the engine)."""

    step: int = 0
    best: float = 0.0
    last_eval: int = 0
    wall: float = 0.0
    cursor: dict | None = None
    scheduler: dict | None = None


class Checkpoints:
    """The run's ``checkpoints/``: DeepSpeed's tags ``stepN`` with the trainer's :class:`Progress` as their client
    state (``step``, ``wall_seconds``, ``best_test_acc``, ``last_eval``, ``data_cursor``)."""

    def __init__(self, run_dir: str, engine: Any) -> None:
        self.dir = os.path.join(run_dir, "checkpoints")
        self.engine = engine

    def _read(self) -> dict:
        """The latest checkpoint loaded into the engine (model, optimizer, schedule, rounds): its client state,
        or ``{}`` when there is none."""
        if not os.path.exists(os.path.join(self.dir, "latest")):
            return {}
        return self.engine.load_checkpoint(self.dir)[1]

    def load(self, worker: int) -> Progress:
        """The run's latest checkpoint, loaded on every rank and agreed (a fresh start when there is none). Its
        data cursor is the writing rank's worker's: kept for a rank of that worker, the others draw from the step."""
        client = agree(self._read)
        cursor = client.get("data_cursor")
        step = client.get("step", 0)
        return Progress(step=step, best=client.get("best_test_acc", 0.0), last_eval=client.get("last_eval", step),
                        wall=client.get("wall_seconds", 0.0),
                        cursor=cursor if cursor and cursor.get("worker") == worker else None)

    def save(self, at: Progress, rank_state_only: bool = False) -> None:
        """Checkpoint tag ``step{at.step}`` (``rank_state_only``: this rank's own state alone, e.g. an elastic
        node that does not write the run's record)."""
        self.engine.save_checkpoint(self.dir, tag=f"step{at.step}", client_state={
            "step": at.step, "wall_seconds": at.wall, "best_test_acc": at.best, "last_eval": at.last_eval,
            "data_cursor": at.cursor}, rank_state_only=rank_state_only)
