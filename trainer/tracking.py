"""Run directory and wandb: config.yaml, metrics.jsonl, summary.json, and the wandb run.

Only rank 0 writes. wandb runs offline unless an API key is configured, so no account is needed
and ``wandb sync runs/NAME/wandb/offline-run-*`` uploads later.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from typing import Any

import yaml

from risgd_common.atomic import write_text_atomic


class RunTracker:
    def __init__(self, run_dir: str, cfg: dict, active: bool, resume_step: int = 0):
        self.run_dir, self.active = run_dir, active
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb_run = None
        self._previous: dict = {}
        self._finishing = False
        if not active:
            return
        os.makedirs(run_dir, exist_ok=True)
        config_path = os.path.join(run_dir, "config.yaml")
        if not os.path.exists(config_path):  # a continued run keeps the record it started with
            write_text_atomic(config_path, yaml.safe_dump(cfg, sort_keys=False))
        self._truncate_metrics(resume_step)
        if cfg["wandb"]["enabled"]:
            self._init_wandb(cfg)

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            # membership events stay: they happened, whatever is trained again
            lines = [line for line in f if line.strip() and (json.loads(line)["step"] <= step
                                                             or "event" in json.loads(line))]
        write_text_atomic(self.metrics_path, "".join(lines))

    def _init_wandb(self, cfg: dict) -> None:
        import wandb

        mode = cfg["wandb"]["mode"] or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        id_path = os.path.join(self.run_dir, "wandb_id")
        run_id = open(id_path).read().strip() if os.path.exists(id_path) else secrets.token_hex(4)
        write_text_atomic(id_path, run_id)
        self.wandb_run = wandb.init(project=cfg["wandb"]["project"], group=cfg["wandb"]["group"],
                                    name=os.path.basename(self.run_dir), id=run_id, resume="allow",
                                    config=cfg, dir=self.run_dir, mode=mode)
        if mode == "offline":
            # A resumed run writes a new offline directory: it gets the whole history from
            # metrics.jsonl (the record of truth), so the newest directory alone is complete even
            # when an interrupted part lost its last rows (wandb's service gets the same Ctrl-C).
            for row in self.history():
                self.wandb_run.log({k: v for k, v in row.items() if v is not None}, step=row["step"])
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        """Ctrl-C, or the launcher's SIGTERM: mark the wandb run preempted and finish it (best
        effort: its service may be stopped by the same signal), then end as the signal would have.
        A second signal while finishing waits for the finish."""
        if self._finishing:
            return
        self._finishing = True
        run, self.wandb_run = self.wandb_run, None
        try:
            if run is not None:
                run.summary["preempted"] = True
                run.mark_preempting()
                run.finish(exit_code=128 + signum)
        except Exception:  # the run's service may be going down with us
            pass
        finally:
            previous = self._previous.get(signum, signal.SIG_DFL)
            for other, handler in self._previous.items():
                signal.signal(other, handler)
            self._previous.clear()
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signum)

    def history(self) -> list[dict[str, Any]]:
        """The lines logged so far (rank 0; empty elsewhere)."""
        if not self.active or not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def last_logged(self) -> dict[str, Any] | None:
        """The last evaluation logged (membership events are not evaluations)."""
        lines = [m for m in self.history() if "event" not in m]
        return lines[-1] if lines else None

    def events(self) -> list[dict[str, Any]]:
        """The membership events of an elastic run (rank 0; empty elsewhere)."""
        return [m for m in self.history() if m.get("event") == "membership"]

    def min_logged(self, key: str) -> float | None:
        """The smallest value of ``key`` over the whole run, resumed parts included."""
        values = [m[key] for m in self.history() if m.get(key) is not None]
        return min(values, default=None)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if v is not None}, step=metrics["step"])

    def hand_over(self) -> None:
        """Stop writing the record (a live run's record moved to another node): its wandb run ends here."""
        if self.active and self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self.active = False

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.active:
            return
        write_text_atomic(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
        for signum, handler in self._previous.items():  # the next run of a plan installs its own
            signal.signal(signum, handler)
        self._previous.clear()
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)
            self.wandb_run.finish()


def run_metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """The engine's accounting (``engine.risgd.consensus()``) under the run record's names: the
    one mapping behind every metrics.jsonl line and summary.json."""
    return {"round": stats["rounds"], "comm_rounds": stats["comm_rounds"], "comm_bytes": stats["bytes_allreduced"],
            "comm_seconds": stats["comm_seconds"], "compute_seconds": stats["compute_seconds"],
            "divergence": stats["divergence"], "divergence_mean": stats["divergence_mean"],
            "live_ranks": stats["live_ranks"], "non_finite_left_out": stats.get("non_finite_left_out", 0),
            **_node_and_overlap(stats)}


def _node_and_overlap(stats: dict[str, Any]) -> dict[str, Any]:
    """With the node level or overlap: the intra-node traffic and the time steps waited on a round."""
    if stats.get("node_size", 1) == 1 and not stats.get("overlap"):
        return {}
    return {"intra_bytes": stats["intra_bytes"], "intra_comm_seconds": stats["intra_comm_seconds"],
            "comm_wait_seconds": stats["comm_wait_seconds"], "view_wait_seconds": stats["view_wait_seconds"],
            "inter_collectives": stats["inter_collectives"],
            "workers": stats["workers"]}


def read_offline_history(run_dir: str, newest: bool = False) -> list[dict[str, Any]]:
    """The metrics logged to the run's offline wandb files (``wandb/offline-run-*/run-*.wandb``;
    ``newest``: only the newest directory's, which a resumed run fills with the whole history).

    The file is a LevelDB-style log of protobuf records (32 KiB blocks, 7-byte record headers)
    after a 7-byte ``:W&B`` header; recent wandb versions read it only from their Go core, so this
    small reader lets tests and users check what an offline run holds before ``wandb sync``.
    """
    import glob
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    rows: list[dict[str, Any]] = []
    paths = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
    for path in paths[-1:] if newest else paths:
        with open(path, "rb") as f:
            data = f.read()
        if data[:4] != b":W&B":
            raise ValueError(f"{path} is not a wandb run file")
        pos, block, pending = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            payload = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            pending = payload if kind in (1, 2) else pending + payload
            if kind not in (1, 4):  # FULL=1, FIRST=2, MIDDLE=3, LAST=4
                continue
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
