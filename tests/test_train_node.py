"""train.py with the node level and overlap: one real 4-rank `deepspeed` launch seen as 2 nodes x 2
ranks (a plan of three runs), the per-node manifest, and the records."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from risgd_trainer.run_config import RecipeError, resolve_run
from tests.test_train import launch

pytestmark = pytest.mark.slow  # `make quick` leaves these out (see pyproject's markers)

STEPS, TAU = 24, 6
RUNS = {
    "node": ["node_size=2"],
    "node-overlap": ["node_size=2", "overlap=true"],
    "node-intra-overlap": ["node_size=2", "tau_intra=3", "overlap=true", "overlap_delay=2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir):
    runs_dir = tmp_path_factory.mktemp("runs")
    plan = runs_dir / "plan.yaml"
    plan.write_text(yaml.safe_dump([[*keys, f"run_name={name}"] for name, keys in RUNS.items()]))
    proc = launch(["--plan", str(plan), "algorithm=risgd", "mu=0.5", f"steps={STEPS}", f"tau={TAU}", "eval_every=12",
                   "checkpoint_every=9", f"data.shards={digits_dir}", f"runs_dir={runs_dir}", "wandb.enabled=false"],
                  ranks=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: os.path.join(runs_dir, name) for name in RUNS}


def read(run_dir: str) -> tuple[dict, list[dict], dict]:
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "manifest.yaml")) as f:
        manifest = yaml.safe_load(f)
    return summary, metrics, manifest


@pytest.mark.parametrize("name", list(RUNS))
def test_a_node_is_one_worker_and_the_ranks_end_identical(runs, name):
    summary, metrics, manifest = read(runs[name])
    assert manifest["workers"] == 2 and manifest["mu"] == 0.5  # built per node: 2 workers of 2 ranks
    assert (summary["world_size"], summary["node_size"], summary["workers"]) == (4, 2, 2)
    assert len(set(summary["rank_model_sha256"])) == 1  # every rank holds the final average
    assert summary["comm_rounds"] == STEPS // TAU
    assert summary["intra_bytes"] > 0 and summary["final_test_acc"] > 30
    assert [m["step"] for m in metrics] == [12, 24]
    ds = json.load(open(os.path.join(runs[name], "ds_config.json")))
    assert ds["risgd"]["node_size"] == 2
    assert ("overlap" in ds["risgd"]) == ("overlap=true" in RUNS[name])


def test_overlap_records_waits_and_the_node_run_none(runs):
    node, _, _ = read(runs["node"])
    overlapped, _, _ = read(runs["node-overlap"])
    assert node["comm_wait_seconds"] == 0.0
    assert overlapped["comm_wait_seconds"] >= 0.0 and overlapped["overlap"] is True
    assert node["comm_bytes"] == overlapped["comm_bytes"]  # the same rounds, the same payload


def test_the_flat_run_config_is_unchanged(tmp_path, digits_dir):
    run = resolve_run("recipes/digits.yaml", [f"runs_dir={tmp_path}"], 4)
    assert not set(run.ds_config["risgd"]) & {"node_size", "tau_intra", "overlap", "overlap_delay"}
    assert run.name == "digits-risgd-tau50-mu0.5-s0" and run.workers == 4
    node = resolve_run("recipes/digits.yaml", [f"runs_dir={tmp_path}", "node_size=2", "overlap=true"], 4)
    assert node.name == "digits-risgd-tau50-node2-ov-mu0.5-s0" and node.workers == 2


@pytest.mark.parametrize("overrides, words", [
    (["node_size=3"], "node_size=3 does not divide the 4 ranks"),
    (["algorithm=sync", "mu=0", "node_size=2"], "algorithm sync all-reduces gradients"),
    (["node_size=2", "mu=0.75"], "mu"),  # 2 workers: mu at most 1/2
    (["tau_intra=7", "node_size=2"], "must be a multiple of risgd.tau_intra=7"),
])
def test_node_level_recipe_errors(overrides, words, tmp_path):
    with pytest.raises(RecipeError, match=words):
        resolve_run("recipes/digits.yaml", [f"runs_dir={tmp_path}", *overrides], 4)
