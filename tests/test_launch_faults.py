"""Real 2-rank `deepspeed` launches of train.py for what a user gets wrong: a run that cannot end on
an average, a re-run under another configuration, bad input found after the process group exists
(on rank 0, or on rank 1 only). Each must end with one clear line, exit 2, lose no run record and
leave no DeepSpeed shared-memory buffer behind."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest
from helpers import launch_trainer

from risgd_common.ports import free_port
from risgd_data.index import load_index
from risgd_data.manifest import build_manifest

pytestmark = pytest.mark.slow  # `make quick` leaves these out (see pyproject's markers)


def launch(*overrides: str, ranks: int = 2) -> tuple[subprocess.CompletedProcess, int]:
    port = free_port()
    return launch_trainer(["wandb.enabled=false", *overrides], ranks, port=port), port


def shm_buffers(port: int) -> list[str]:
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    """The lines a user reads: the launcher prefixes rank output with '[...]' only in some modes."""
    text = proc.stdout + proc.stderr
    return [line for line in text.splitlines() if "error: " in line]


def record(run_dir: str) -> dict[str, bytes]:
    out = {}
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "manifest.yaml", "checkpoints/latest"):
        with open(os.path.join(run_dir, name), "rb") as f:
            out[name] = f.read()
    return out


# Two tests' runs in one launch (a plan), after the same plan with a run that cannot end on an average
# was refused whole: three launches' start-up folded into two.
WARMUP = ["warmup_sync_steps=5", "tau=10", "eval_every=10"]
RERUN = ["steps=20", "tau=5", "eval_every=10", "run_name=r"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory, digits_dir):
    base = tmp_path_factory.mktemp("planned")
    common = ["wandb.enabled=false", f"data.shards={digits_dir}", f"runs_dir={base}"]
    ok, rerun = [*WARMUP, "steps=45", "run_name=ok"], list(RERUN)
    # 40 steps end 5 steps into a round: the whole plan is refused before any work, naming the lengths that work
    refused = launch_trainer(common, plan=[[*WARMUP, "steps=40", "run_name=mid"], ok, rerun], plan_dir=str(base))
    trained = launch_trainer(common, plan=[ok, rerun], plan_dir=str(base))
    return {"base": base, "common": common, "refused": refused, "trained": trained}


def test_warmup_rounds_end_where_the_engine_says(planned):
    base, proc = planned["base"], planned["refused"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert any("use steps=35 or steps=45" in line for line in errors(proc))
    assert not os.path.exists(base / "mid") and planned["trained"].returncode == 0, planned["trained"].stderr[-3000:]
    with open(base / "ok" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [15, 25, 35, 45]  # the first average at or after each multiple of 10
    with open(base / "ok" / "summary.json") as f:
        summary = json.load(f)
    assert summary["rank_model_sha256"] == [summary["model_sha256"]] * 2


def test_a_rerun_never_continues_or_rewrites_another_experiment(planned):
    base = planned["base"]
    assert planned["trained"].returncode == 0, planned["trained"].stderr[-3000:]
    before = record(str(base / "r"))
    common = [*planned["common"], *RERUN]
    proc, _ = launch(*common, "data.partition=iid", "optimizer.lr=0.2")
    assert proc.returncode == 2
    (line,) = errors(proc)
    assert "data.partition: 'label_sorted' -> 'iid'" in line and "optimizer.lr: 0.05 -> 0.2" in line
    assert record(str(base / "r")) == before
    proc, _ = launch(*common)  # the same run again: finished, nothing to do, nothing rewritten
    assert proc.returncode == 0 and "is finished" in proc.stdout + proc.stderr
    assert record(str(base / "r")) == before


def test_bad_input_after_the_process_group_exits_2_with_one_line_and_no_leak(tmp_path):
    proc, port = launch("data.shards=" + str(tmp_path / "none"), "data.dataset=cifar10",
                        "data.src=" + str(tmp_path / "missing.tar.gz"), f"runs_dir={tmp_path}")
    assert proc.returncode == 2
    (line,) = errors(proc)
    assert "missing.tar.gz" in line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert shm_buffers(port) == []


def test_a_corrupt_shard_only_rank_1_reads_is_reported_once_by_rank_0(tmp_path, digits_dir):
    shards = tmp_path / "shards"
    shutil.copytree(digits_dir, shards)
    manifest = build_manifest(load_index(str(shards)), 2, 0.0, partition="iid", seed=0)
    only_rank1 = sorted(set(manifest["ranks"][1]["shards"]) - set(manifest["ranks"][0]["shards"]))
    assert only_rank1, "the iid split gives rank 1 shards of its own"
    with open(shards / only_rank1[0], "r+b") as f:  # flip one byte: the sha256 no longer matches
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc, port = launch("algorithm=prsgd", "mu=0", "data.partition=iid", "steps=10", "tau=5",
                        f"data.shards={shards}", f"runs_dir={tmp_path}")
    assert proc.returncode == 2
    (line,) = errors(proc)
    assert only_rank1[0] in line and "sha256" in line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert shm_buffers(port) == []
