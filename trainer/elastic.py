"""Elastic continuation of a run: identity by data, the live workers' coverage, the floor, and the
record of each membership change.

An elastic run (recipe key ``elastic.workers`` = p > 0) is launched by torchrun with
``--nnodes=MIN:MAX``; when a node is lost, torch's elastic agent stops the survivors' workers and
starts them again with new RANK/WORLD_SIZE. Rank numbers therefore mean nothing across restarts:
each rank learns which manifest worker it serves from its node's replica (``data.replicate``
records it in ``.risgd-replica.json``: the replica directory is ``data.shards``, or the
``RISGD_REPLICA_DIR`` variable, e.g. for several "nodes" on one machine), so its chunks, its loader
position and its optimizer state (the engine keys checkpoint state by worker) follow the node.

The run directory keeps ``elastic/membership.json`` (one entry per start: step, workers, world
size, coverage) and one heartbeat file per worker (``elastic/beat-wNNNNN.json``, the time of its
last step, written at most every half second). After a restart, the earliest last heartbeat of the
previous members is when the failure happened; the seconds from it to the first step of the new
membership are logged in the membership event (``metrics.jsonl``, ``"event": "membership"``).
"""

from __future__ import annotations

import json
import os
import time

import yaml

from risgd_common.atomic import write_text_atomic
from risgd_data.errors import DataError
from risgd_data.manifest import load_manifest
from risgd_data.replicate import read_replica

STOP_FILE_ENV = "RISGD_ELASTIC_STOP_FILE"  # risgd-elastic names a file here: the trainer writes its refusal to it
REPLICA_ENV = "RISGD_REPLICA_DIR"
BEAT_EVERY_S = 0.5


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


def duplicate_claims(workers: list[int], dirs: list[str]) -> str | None:
    """One line if two ranks claim one manifest worker (None: every worker served at most once)."""
    for r, w in enumerate(workers):
        other = workers.index(w)
        if other != r:
            return (f"ranks {other} and {r} both serve manifest worker {w} (replicas {dirs[other]} and {dirs[r]}): "
                    "every node needs its own replica (python -m data.replicate --node-rank K, one K per node); "
                    f"on one machine give each agent its own {REPLICA_ENV}")
    return None


def floor_error(cfg: dict, workers: list[int], coverage: float, p: int) -> str | None:
    """One line if the live workers are below the run's floor (None: the run goes on)."""
    el = cfg["elastic"]
    lost = sorted(set(range(p)) - set(workers))
    if len(workers) < el["min_workers"]:
        below = f"{len(workers)} live worker(s), fewer than elastic.min_workers={el['min_workers']}"
    elif coverage < el["min_coverage"] - 1e-12:
        below = (f"the {len(workers)} live workers {sorted(workers)} hold {100 * coverage:.1f}% of the training set, "
                 f"below elastic.min_coverage={el['min_coverage']:g}")
    else:
        return None
    return (f"elastic run stopped: {below}; the latest checkpoint is kept: bring back a node with a replica of "
            f"worker(s) {lost} (python -m data.replicate --node-rank K ...) or lower the floor to go on")


class Membership:
    """This start's membership (rank 0 records it; every rank beats)."""

    def __init__(self, run_dir: str, workers: list[int], coverage: float, worker: int, rank: int):
        self.dir = os.path.join(run_dir, "elastic")
        self.workers, self.coverage, self.worker, self.rank = sorted(workers), coverage, worker, rank
        self.generation = 0
        self.history: list[dict] = []
        self._last_beat = 0.0
        self._path = os.path.join(self.dir, "membership.json")
        os.makedirs(self.dir, exist_ok=True)
        if os.path.exists(self._path):
            with open(self._path) as f:
                self.history = json.load(f)

    def start(self, step: int, generation: int, restored: dict[int, str] | None = None) -> None:
        """Record this start (rank 0), before its first step. ``restored``: per worker, whether it
        resumed from its "own" state or from the "average" (it had none in the checkpoint)."""
        self.generation, self.step = generation, step
        self.restored = {int(w): how for w, how in sorted((restored or {}).items())}
        self.previous = next((g for g in reversed(self.history) if g["generation"] < generation), None)
        self.failed_at = self._failure_time(self.previous)
        if self.rank == 0:
            self.history = [g for g in self.history if g["generation"] < generation]
            self.history.append({"generation": generation, "step": step, "workers": self.workers,
                                 "world_size": len(self.workers), "data_coverage": self.coverage,
                                 "started": time.time(),
                                 "torchelastic_restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))})
            write_text_atomic(self._path, json.dumps(self.history, indent=1) + "\n")

    def _failure_time(self, previous: dict | None) -> tuple[float, int] | None:
        """(time, step) of the earliest last heartbeat of the previous members: when the first one stopped."""
        if previous is None:
            return None
        beats = []
        for w in previous["workers"]:
            try:
                with open(self._beat_path(w)) as f:
                    beat = json.load(f)
            except (OSError, ValueError):
                continue
            if beat.get("generation") == previous["generation"]:
                beats.append((beat["time"], beat["step"]))
        return min(beats) if beats else None

    def _beat_path(self, worker: int) -> str:
        return os.path.join(self.dir, f"beat-w{worker:05d}.json")

    def beat(self, step: int, force: bool = False) -> None:
        """This worker's heartbeat: the time of its latest step (at most every BEAT_EVERY_S)."""
        now = time.time()
        if force or now - self._last_beat >= BEAT_EVERY_S:
            self._last_beat = now
            path = self._beat_path(self.worker)
            tmp = f"{path}.tmp"  # replaced whole, but not fsync'ed: a beat is worth no disk flush in the loop
            with open(tmp, "w") as f:
                f.write(json.dumps({"time": now, "step": step, "generation": self.generation}))
            os.replace(tmp, path)

    def event(self, first_step_time: float) -> dict:
        """The membership event of this start, logged at its first step."""
        prev = self.previous
        event = {"step": self.step, "event": "membership", "generation": self.generation,
                 "live_workers": self.workers, "world_size": len(self.workers), "data_coverage": self.coverage,
                 "lost_workers": sorted(set(prev["workers"]) - set(self.workers)) if prev else [],
                 "joined_workers": sorted(set(self.workers) - set(prev["workers"])) if prev else [],
                 "torchelastic_restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
                 "restored": {str(w): how for w, how in self.restored.items()}}
        if self.failed_at is not None:
            failed_time, failed_step = self.failed_at
            event["seconds_from_failure_to_step"] = first_step_time - failed_time
            event.update(failed_at=failed_time, first_step_at=first_step_time)
            event["steps_redone"] = max(failed_step - self.step, 0)
        return event

    def summary(self, events: list[dict], seconds_per_step: float) -> dict:
        """The run's elastic record for summary.json. ``goodput``: the share of the wall time since
        the first start that was not lost to restarts (seconds from each failure to the next step)
        or to steps trained again (``steps_redone`` at ``seconds_per_step``)."""
        lost = sum(e.get("seconds_from_failure_to_step", 0.0) for e in events)
        redone = sum(e.get("steps_redone", 0) for e in events)
        elapsed = time.time() - self.history[0]["started"] if self.history else 0.0
        wasted = lost + redone * seconds_per_step
        return {"elastic_workers": None, "restarts": max(len(self.history) - 1, 0),
                "membership": [{k: g[k] for k in ("step", "workers", "world_size", "data_coverage")}
                               for g in self.history],
                "world_sizes": [g["world_size"] for g in self.history],
                "seconds_lost": lost, "steps_redone": redone,
                "goodput": max(0.0, 1.0 - wasted / elapsed) if elapsed > 0 else None}


class LiveRecord:
    """A live (torchft) run on this node: the floor over the quorum's nodes, which node writes the
    record (the one serving the lowest live worker: it moves when that node is lost or one lower comes
    back), and the membership events with the data their nodes hold."""

    def __init__(self, run, manifest: dict, index: dict, worker: int):
        self.run, self.manifest, self.index, self.worker = run, manifest, index, worker
        self.workers = manifest["workers"]
        self.recording = False
        self.events: list[dict] = []
        self._first: dict | None = None
        self._drawn_for: frozenset | None = None  # the nodes the loader's draw was scaled for
        self.redraw = False
        self._coverage: dict[frozenset, float] = {}

    def coverage(self, members) -> float:
        from risgd_data.manifest import live_coverage

        key = frozenset(members)
        if key not in self._coverage:
            self._coverage[key] = live_coverage(self.manifest, self.index, set(key))
        return self._coverage[key]

    def accept(self, members) -> str | None:
        """Why ``members`` are below the run's floor (elastic.min_workers, elastic.min_coverage), or None."""
        return floor_error(self.run.cfg, sorted(members), self.coverage(members), self.workers)

    def members(self, ctl) -> frozenset:
        return frozenset(ctl._members or {self.worker})

    def draw_scales(self, ctl) -> list[float] | None:
        """This node's factor per chunk it holds, for the nodes live now (None: all are, nothing to scale)."""
        from risgd_data.manifest import chunk_draw_scales

        members = self.members(ctl)
        self._drawn_for = members
        if len(members) == self.workers:
            return None
        return chunk_draw_scales(self.manifest, members)[self.worker]

    def started(self, ctl, start: int) -> None:
        self.start, self.recording = start, self.worker == min(self.members(ctl))
        members = sorted(self.members(ctl))
        self._first = {"step": start, "event": "membership", "generation": ctl.live.current.quorum_id,
                       "live_workers": members, "world_size": len(members), "data_coverage": self.coverage(members),
                       "lost_workers": [], "joined_workers": [], "healed": bool(start and ctl.live.current.healing),
                       "quorum_seconds": ctl.live.current.seconds, "failed_attempts": 0, "failed_seconds": 0.0,
                       "steps_redone": 0}

    def write_final(self, digest: str) -> None:
        """This node's final model digest, beside the others' (``elastic/final-wNNNNN.json``)."""
        path = os.path.join(self.run.run_dir, "elastic", f"final-w{self.worker:05d}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text_atomic(path, json.dumps({"worker": self.worker, "model_sha256": digest}) + "\n")

    def start_line(self, start: int) -> str:
        how = f", healed from a live peer at step {start}" if start else ""
        return (f"live: this node serves worker {self.worker} of {self.workers} (torchft; lighthouse "
                f"{os.environ.get('TORCHFT_LIGHTHOUSE')}){how}")

    def after_step(self, ctl, step: int, tracker, rank: int):
        """Log the quorum's changes since the last step; hand the record over when its writer changes.
        Returns the tracker to use from here."""
        from risgd_trainer.tracking import RunTracker

        if self._first is not None:  # this node's start: the quorum it joined
            self.events.append(self._first)
            tracker.log(self._first)
            self._first = None
        for e in ctl.take_events():
            if not (e.lost or e.joined or e.healed):
                continue
            self.events.append({"step": step, "event": "membership", "generation": e.quorum_id,
                                "live_workers": e.members, "world_size": len(e.members),
                                "data_coverage": self.coverage(e.members), "lost_workers": e.lost,
                                "joined_workers": e.joined, "healed": e.healed, "quorum_seconds": e.seconds,
                                "failed_attempts": e.failed_attempts, "failed_seconds": e.attempt_seconds,
                                "steps_redone": 0})
            tracker.log(self.events[-1])
        self.redraw = self._drawn_for is not None and self.members(ctl) != self._drawn_for
        recording = self.worker == min(self.members(ctl))
        if recording and not self.recording:
            tracker = RunTracker(self.run.run_dir, self.run.cfg, active=rank == 0, resume_step=step)
        elif self.recording and not recording:
            tracker.hand_over()
        self.recording = recording
        return tracker

    def summary(self, ctl, tracker) -> dict:
        """The run's elastic record for summary.json (as the torchrun path's: ``restarts`` counts the
        quorum's changes; nothing restarted)."""
        events = tracker.events() or self.events
        changes = [e for e in events if e.get("lost_workers") or e.get("joined_workers")]
        lost = sum(e.get("quorum_seconds", 0.0) + e.get("failed_seconds", 0.0) for e in changes)
        members = sorted(self.members(ctl))
        return {"elastic_backend": "torchft", "elastic_workers": self.workers, "live_workers": members,
                "restarts": len(changes), "retries": ctl.retries, "retry_seconds": ctl.retry_seconds,
                "membership": [{"step": e["step"], "workers": e["live_workers"], "world_size": e["world_size"],
                                "data_coverage": e["data_coverage"]} for e in events],
                "world_sizes": [e["world_size"] for e in events], "seconds_lost": lost, "steps_redone": 0}

