"""Who trains, seen from the trainer: a fixed run's ranks, or the live nodes of an elastic run.

:func:`nodes_for` gives the training loop one object either way, so the trainer
(:class:`risgd_trainer.train.Trainer`) has no elastic branches: :class:`FixedNodes` (every worker
for the whole run) or :class:`ElasticNodes` (one node of an elastic run on torchft: a quorum at
every round, a lost node dropped, a returning one healed from a live peer; nobody restarted). The
two speak in values: :meth:`~FixedNodes.join` returns the :class:`~risgd_trainer.checkpoints.Progress`
a node was healed to, :meth:`~FixedNodes.after_step` an :class:`AfterStep`. Who is live is decided by the engine alone
(``RISGDController.membership_view()``, a frozen :class:`~risgd_ext.membership.MembershipView`: the quorum's
nodes less the ``failures`` schedule's); this module only turns it into the data's coverage, the data floor and
the run record. The floor of live nodes (``elastic.min_workers``, the engine's ``risgd.min_nodes``) is the engine's
check alone; :func:`stop_line` words its stop in the recipe's keys.

Identity is by data, not by rank: each node learns which manifest worker it serves from its
replica (``data.replicate`` records it in ``.risgd-replica.json``: the replica directory is
``data.shards``, or the ``RISGD_REPLICA_DIR`` variable, e.g. for several "nodes" on one machine).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml
from tqdm import tqdm

from risgd_common.atomic import write_text_atomic
from risgd_data.errors import DataError
from risgd_data.manifest import load_manifest
from risgd_data.replicate import read_replica
from risgd_trainer.checkpoints import Progress

if TYPE_CHECKING:
    from risgd_trainer.tracking import RunTracker

REPLICA_ENV = "RISGD_REPLICA_DIR"


def replica_dir(cfg: dict) -> str:
    """This node's replica: ``$RISGD_REPLICA_DIR`` if set, else ``data.shards``."""
    return os.environ.get(REPLICA_ENV) or cfg["data"]["shards"]


def _as_written(manifest: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(manifest))


def worker_of_replica(manifest: dict, shard_dir: str, local_rank: int) -> int:
    """The manifest worker this rank serves: the ``local_rank``-th of those its node's replica
    records, checked against the run's manifest (DataError, one line, otherwise)."""
    record = read_replica(shard_dir)
    path = os.path.join(shard_dir, record["manifest"])
    try:
        theirs = load_manifest(path)
    except DataError as e:
        raise DataError(f"the replica in {shard_dir} names manifest {record['manifest']}, which cannot be read ({e})"
                        ": re-run python -m data.replicate for this node") from None
    p = manifest["workers"]
    outside = [w for w in record["workers"] if w >= p]
    if outside or _as_written(theirs) != _as_written(manifest):
        why = (f"worker(s) {outside} of {theirs['workers']}" if outside
               else f"worker(s) {record['workers']} of another manifest ({record['manifest']} differs from the run's)")
        raise DataError(f"the replica in {shard_dir} holds {why}, which belong to no slot of this run's {p}-worker "
                        "manifest: replicate this run's manifest to this node (python -m data.replicate --manifest "
                        "M.yaml --node-rank K ...) or point data.shards / RISGD_REPLICA_DIR at its replica")
    if local_rank >= len(record["workers"]):
        raise DataError(f"local rank {local_rank} has no worker in the replica {shard_dir}, which serves "
                        f"{record['workers']}: start {len(record['workers'])} process(es) on this node "
                        "(--nproc-per-node)")
    return record["workers"][local_rank]


def floor_error(cfg: dict, workers: list[int], coverage: float, p: int) -> str | None:
    """One line if the live workers hold too little of the training set (``elastic.min_coverage``; None: the run
    goes on). Too few live nodes (``elastic.min_workers``) is the engine's check (``risgd.min_nodes``), made before
    this one is asked; :func:`stop_line` words it in the recipe's key."""
    el = cfg["elastic"]
    if coverage >= el["min_coverage"] - 1e-12:
        return None
    lost = sorted(set(range(p)) - set(workers))
    return (f"elastic run stopped: the {len(workers)} live workers {sorted(workers)} hold {100 * coverage:.1f}% of "
            f"the training set, below elastic.min_coverage={el['min_coverage']:g}; the latest checkpoint is kept: "
            f"bring back a node with a replica of worker(s) {lost} (python -m data.replicate --node-rank K ...) or "
            "lower the floor to go on")


# the engine's keys in its floor's words, and the recipe keys a user of the trainer types for them
_RECIPE_KEYS = ((r"(?<![\w.])risgd\.min_nodes\b", "elastic.min_workers"),
                (r"(?<![\w.])min_nodes=", "elastic.min_workers="),
                (r"(?<![\w.])floor_wait_s=", "elastic.floor_wait_s="))


def stop_line(error: Exception) -> str:
    """The one line an elastic run stops with, in the recipe's keys: the engine's floor (``risgd.min_nodes``,
    ``floor_wait_s``) is ``elastic.min_workers`` and ``elastic.floor_wait_s`` here. A stop below the floor says
    the latest checkpoint is kept and the same commands resume the run."""
    line = str(error)
    for engine_key, recipe_key in _RECIPE_KEYS:
        line = re.sub(engine_key, recipe_key, line)
    if line.startswith("below the floor") and "checkpoint is kept" not in line:
        line = (f"elastic run stopped {line}; the latest checkpoint is kept: the same commands resume the run once "
                "enough nodes run")
    return line


def checkpoint_step(run_dir: str) -> int | None:
    """The step of the run's latest checkpoint (``checkpoints/latest``; None: none yet)."""
    try:
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            tag = f.read().strip()
    except OSError:
        return None
    return int(tag[4:]) if re.fullmatch(r"step\d+", tag) else None


def finished_step(run_dir: str, steps: int) -> int | None:
    """The step at which the other nodes finished the run (its ``summary.json``, written by the record's node
    before it leaves the live nodes, of ``steps`` steps); None: the run is not finished."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            done = json.load(f).get("steps")
    except (OSError, ValueError, AttributeError):
        return None
    return done if done == steps else None


@dataclass(frozen=True)
class AfterStep:
    """What a round's aftermath asks of the training loop: the run record's tracker from here (a new one when
    this node took the record over), the step its loader starts again at (None: it goes on), and the live
    peer's progress when this node was healed to it (its step is ``restart``)."""

    tracker: RunTracker
    restart: int | None = None
    healed: Progress | None = None


class FixedNodes:
    """A fixed-size run: every worker's ranks for the whole run (the ``failures`` schedule may mark
    some down in a round; the engine says which)."""

    recording = True  # rank 0 writes the run record
    identity: int | None = None  # checkpoint state by rank

    def __init__(self, run, manifest: dict, index: dict, worker: int):
        self.run, self.manifest, self.index, self.worker = run, manifest, index, worker
        self._coverage: dict[frozenset, float] = {}

    def rng_id(self, rank: int) -> int:
        """Whose per-rank random stream this rank draws (dropout): its rank's."""
        return rank

    def coverage(self, ctl) -> float:
        """The share of the training set the live workers hold (the engine decides who is live)."""
        return self._coverage_of(ctl.membership_view().live_workers)

    def _coverage_of(self, members) -> float:
        from risgd_data.manifest import live_coverage

        key = frozenset(members)
        if key not in self._coverage:
            self._coverage[key] = live_coverage(self.manifest, self.index, set(key))
        return self._coverage[key]

    def accept(self, members) -> str | None:
        """Why the workers ``members`` alone would be below the run's floor (elastic.min_workers,
        elastic.min_coverage), or None: asked of the workers on time at a round's deadline (a late one is left out
        only when None)."""
        el = self.run.cfg["elastic"]
        if len(members) < el["min_workers"]:
            return f"{len(members)} workers on time, below elastic.min_workers={el['min_workers']}"
        coverage = self._coverage_of(members)
        if coverage < el["min_coverage"] - 1e-12:
            return (f"the {len(members)} workers on time {sorted(members)} hold {coverage:.1%} of the training set, "
                    f"below elastic.min_coverage={el['min_coverage']:g}")
        return None

    def join(self, engine, resume: Callable[[], None], standing: Callable[[], Progress]) -> Progress | None:
        """Take part in the run: a fixed run has nothing to meet, and ``resume()``s from its latest
        checkpoint (if any) at once. Returns the progress this node was healed to: None, nobody to heal from."""
        resume()
        return None

    def draw_scales(self, ctl) -> list[float] | None:
        return None

    def after_step(self, ctl, step: int, tracker: RunTracker, rank: int) -> AfterStep:
        """A round's aftermath: nothing changes in a fixed run."""
        return AfterStep(tracker)

    def checkpoint_due(self, ctl, step: int, last: int, every: int) -> bool:
        return bool(every) and step % every == 0

    def over(self, step: int | None = None) -> str | None:
        """The one line saying the other nodes finished the run (None: it goes on; a fixed run has no others)."""
        return None

    def behind(self, step: int) -> str | None:
        """Why this node must not write the run's files at ``step`` (None: it may; a fixed run always may)."""
        return None

    def summary(self, ctl, tracker, wall_seconds: float) -> dict:
        return {}

    def finish(self, ctl, digest: str, rank: int) -> None:
        """After the final average."""


class ElasticNodes(FixedNodes):
    """This launch is one node of an elastic run on torchft (``elastic.workers`` > 0): the floor
    over the quorum's nodes, which node writes the record (the one serving the lowest live worker: it
    moves when that node is lost or one lower comes back), the membership events with the data their
    nodes hold, healing a node that is behind, and each chunk drawn at its share by the live nodes."""

    def __init__(self, run, manifest: dict, index: dict, worker: int):
        super().__init__(run, manifest, index, worker)
        self.workers = manifest["workers"]
        self.identity = worker  # checkpoint state by manifest worker: it follows the node
        self.recording = False
        self.events: list[dict] = []
        self._first: dict | None = None
        self._drawn_for: frozenset | None = None  # the nodes the loader's draw was scaled for
        self._healed: dict = {}  # the trainer's state taken from a live peer, until the loop takes it
        self._standing: Callable[[], Progress] | None = None  # the trainer's progress, for a peer healed from us

    @functools.cached_property
    def total_steps(self) -> int:
        """The run's steps (as the trainer counts them)."""
        from risgd_data.manifest import steps_per_epoch

        return self.run.total_steps(steps_per_epoch(self.manifest, self.run.worker_batch()))

    def rng_id(self, rank: int) -> int:
        """The rank this node's rank ``rank`` would have in a fixed run of the same layout: each rank of a
        node-level worker draws its own stream, as it does there."""
        return self.worker * self.run.node_size + rank

    def accept(self, members) -> str | None:
        """Why ``members`` are below the run's floor (elastic.min_workers, elastic.min_coverage), or None."""
        return floor_error(self.run.cfg, sorted(members), self._coverage_of(members), self.workers)

    def join(self, engine, resume: Callable[[], None], standing: Callable[[], Progress]) -> Progress | None:
        """Meet the live nodes in torchft's quorum. A node behind them (it joins a run in progress) is
        healed from a live peer: its model, optimizer and round state, and the trainer's progress (schedule,
        best accuracy and wall clock) at their step, returned; no checkpoint file is read. A start of the
        whole run (nobody ahead) ``resume()``s from the run's latest checkpoint, if any, and returns None.
        ``standing()``: the trainer's progress now, which a node healed from this one takes (asked in torchft's
        quorum thread, whenever a peer joins)."""
        ctl = engine.risgd
        self._standing = standing
        taken = None
        if ctl.go_live(self.worker, self.workers, accept=self.accept, resume=resume, over=self.over,
                       state={"trainer": (self._healed.update, self._trainer_state)}):
            taken = self._take_healed(ctl.take_healed())
        start = (taken or standing()).step
        view = ctl.membership_view()
        self.recording = self.worker == min(view.members)
        members = sorted(view.members)
        healed = bool(start and view.healing)
        ctl.take_events()  # the quorum this node started or joined in: the one event below says it
        self._first = {"step": start, "event": "membership", "generation": view.quorum_id,
                       "live_workers": members, "world_size": len(members), "data_coverage": self._coverage_of(members),
                       "lost_workers": [], "joined_workers": [self.worker] if healed else [], "healed": healed,
                       "quorum_seconds": view.quorum_seconds, "failed_attempts": 0, "failed_seconds": 0.0,
                       "steps_redone": 0}
        if engine.global_rank == 0:
            how = f", healed from a live peer at step {start}" if start and view.healing else ""
            print(f"live: this node serves worker {self.worker} of {self.workers} (torchft; lighthouse "
                  f"{os.environ.get('TORCHFT_LIGHTHOUSE')}){how}", file=sys.stderr, flush=True)
        return taken

    def _trainer_state(self) -> dict:
        """What a joiner takes from this node, besides the engine's state (the wire's form of a Progress)."""
        at = self._standing()
        return {"best": at.best, "last_eval": at.last_eval, "scheduler": at.scheduler, "wall": at.wall}

    def _take_healed(self, step: int) -> Progress:
        """The trainer's progress a live peer handed over with its state, at ``step``."""
        h = self._healed
        return Progress(step=step, best=h["best"], last_eval=h["last_eval"], wall=h["wall"], scheduler=h["scheduler"])

    def draw_scales(self, ctl) -> list[float] | None:
        """This node's factor per chunk it holds, for the nodes live now (None: all are, nothing to scale)."""
        from risgd_data.manifest import chunk_draw_scales

        members = ctl.membership_view().members
        self._drawn_for = members
        if len(members) == self.workers:
            return None
        return chunk_draw_scales(self.manifest, members)[self.worker]

    def after_step(self, ctl, step: int, tracker: RunTracker, rank: int) -> AfterStep:
        """Follow a heal (this node was behind the others at a round: the loop goes on from their step, with
        their progress, returned), log the quorum's changes, hand the record over when its writer changes
        (the tracker returned), and say when the loader must be rebuilt (from the step returned: the healed
        step, or this one when the live nodes changed and the chunks they hold are drawn at their shares again)."""
        from risgd_trainer.tracking import RunTracker

        restart, healed = None, None
        healed_to = ctl.take_healed()
        if healed_to is not None and healed_to != step:
            healed = self._take_healed(healed_to)
            restart = step = healed_to
        # who writes the record is settled first: a node that takes it over (the record's node was lost) logs
        # the change that made it the writer, and those after it
        recording = self.worker == min(ctl.membership_view().members)
        if recording and not self.recording:
            tracker = RunTracker(self.run.run_dir, self.run.cfg, active=rank == 0, resume_step=step)
        elif self.recording and not recording:
            tracker.hand_over()
        self.recording = recording
        if self._first is not None:  # this node's start: the quorum it joined
            self.events.append(self._first)
            tracker.log(self._first)
            self._first = None
        for e in ctl.take_events():
            if not (e.lost or e.joined or e.healed):
                continue
            self.events.append({"step": step, "event": "membership", "generation": e.quorum_id,
                                "live_workers": e.members, "world_size": len(e.members),
                                "data_coverage": self._coverage_of(e.members), "lost_workers": e.lost,
                                "joined_workers": e.joined, "healed": e.healed, "quorum_seconds": e.seconds,
                                "failed_attempts": e.failed_attempts, "failed_seconds": e.attempt_seconds,
                                "steps_redone": 0})
            tracker.log(self.events[-1])
            if rank == 0 and (e.lost or e.joined):
                tqdm.write(membership_line(self.events[-1], self.workers), file=sys.stderr)
        if restart is None and self._drawn_for is not None and ctl.membership_view().members != self._drawn_for:
            restart = step
        return AfterStep(tracker, restart, healed)

    def over(self, step: int | None = None) -> str | None:
        """The one line saying the other nodes finished the run (its ``summary.json``) short of this node's ``step``
        (None: the trainer's step now), or None: asked by the engine at a quorum short of the run's nodes, so that a
        node back from a freeze or a partition after the others finished exits 0 at once instead of waiting alone
        below the floor (or training a stale model on). A node at the final step is not behind: it finishes."""
        done = finished_step(self.run.run_dir, self.total_steps)
        if step is None:
            step = self._standing().step if self._standing is not None else 0
        if done is None or step >= done:
            return None
        return f"{self.run.run_dir}: the run finished at step {done} (by the other nodes): nothing to do"

    def behind(self, step: int) -> str | None:
        """Why this node, at ``step``, must not write the run's files (checkpoints, ``latest``, the record, the
        summary), or None: the run finished, or its latest checkpoint is past ``step``; the node is back from a
        freeze or a partition, behind the others (its next quorum heals it or says the run is over)."""
        why = self.over(step)
        if why is not None:
            return why
        at = checkpoint_step(self.run.run_dir)
        if at is not None and at > step:
            return f"the run's latest checkpoint is at step {at}, past this node's step {step}"
        return None

    def checkpoint_due(self, ctl, step: int, last: int, every: int) -> bool:
        """At averages only, so a worker without state (a lost node's, at a resume) can start from one."""
        return bool(every) and step >= (last // every + 1) * every and ctl.is_average()

    def summary(self, ctl, tracker, wall_seconds: float) -> dict:
        """The run's elastic record for summary.json: ``workers`` and ``world_size`` are the run's (every node's;
        ``node_ranks`` this launch's), ``membership_changes`` counts the quorum's changes (nothing restarted;
        ``restarts``, its old name, is kept as an alias); ``goodput`` is 1 - ``seconds_lost`` / the run's wall
        seconds (no step is redone). ``rank_model_sha256`` lists this node's ranks; every node's final model
        is in ``elastic/final-wNNNNN.json``."""
        events = tracker.events() or self.events
        changes = [e for e in events if e.get("lost_workers") or e.get("joined_workers")]
        lost = sum(e.get("quorum_seconds", 0.0) + e.get("failed_seconds", 0.0) for e in changes)
        members = sorted(ctl.membership_view().members)
        # the run is every node's: its workers and ranks (this launch's ranks are one node's: node_ranks); the
        # quorum's changes are membership changes (nothing restarted: "restarts" is their old name, kept)
        return {"elastic_backend": "torchft", "elastic_workers": self.workers, "live_workers": members,
                "workers": self.workers, "world_size": self.workers * self.run.world_size,
                "node_ranks": self.run.world_size, "membership_changes": len(changes),
                "restarts": len(changes), "retries": ctl.retries, "retry_seconds": ctl.retry_seconds,
                "membership": [{"step": e["step"], "workers": e["live_workers"], "world_size": e["world_size"],
                                "data_coverage": e["data_coverage"]} for e in events],
                "world_sizes": [e["world_size"] for e in events], "seconds_lost": lost, "steps_redone": 0,
                "goodput": max(0.0, 1.0 - lost / wall_seconds) if wall_seconds > 0 else None}

    def finish(self, ctl, digest: str, rank: int) -> None:
        """This node's final model digest, beside the others' (``elastic/final-wNNNNN.json``), and
        this node leaves the live set."""
        if rank == 0:
            path = os.path.join(self.run.run_dir, "elastic", f"final-w{self.worker:05d}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            from risgd_ext.engine import anchor_stamp

            write_text_atomic(path, json.dumps({"worker": self.worker, "model_sha256": digest, "steps": ctl.steps,
                                                "rounds": ctl.rounds, "retries": ctl.retries,
                                                "anchor_stamp": anchor_stamp(ctl),
                                                "members": sorted(ctl.membership_view().members)}) + "\n")
        ctl.membership.leave()


def membership_line(event: dict, workers: int) -> str:
    """The one line a node prints for a change of the live nodes (torchft's own lines are off unless
    ``RISGD_VERBOSE``): who left or joined, the live workers and their data coverage, the seconds lost.
    ``live: step 120: worker 0 left; 1 of 2 workers live [1], data coverage 100.0%, 0.54 s lost to the change``."""
    def who(ids: list[int], what: str) -> str:
        return f"worker{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} {what}"

    said = [who(event[k], what) for k, what in (("lost_workers", "left"), ("joined_workers", "joined")) if event[k]]
    live = event["live_workers"]
    lost = event["quorum_seconds"] + event["failed_seconds"]
    return (f"live: step {event['step']}: {', '.join(said)}; {len(live)} of {workers} workers live {live}, data "
            f"coverage {event['data_coverage']:.1%}, {lost:.2f} s lost to the change")


def nodes_for(run, manifest: dict, index: dict, worker: int) -> FixedNodes:
    """The training loop's view of who trains: :class:`ElasticNodes` in an elastic run, else :class:`FixedNodes`."""
    return (ElasticNodes if run.elastic else FixedNodes)(run, manifest, index, worker)
