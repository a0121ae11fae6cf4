"""Failed workers (paper, section 4.4): how much of the data the live ranks still hold, in the
manifest and in a real training run."""

from __future__ import annotations

import json
import os

import pytest
from helpers import launch_trainer

from risgd_data.index import load_index
from risgd_data.manifest import build_manifest, live_coverage


@pytest.mark.parametrize("mu, down, expected", [
    (0.0, {1}, 0.75),          # PR-SGD: the failed rank's chunk is gone
    (0.25, {1}, 1.0),          # q=2: chunk 1 also lives on rank 0
    (0.25, {0, 1}, 0.75),      # ... but not when both of its holders fail
    (0.5, {0, 1}, 1.0),        # q=3: every chunk has three holders
])
def test_live_coverage(digits_dir, mu, down, expected):
    index = load_index(digits_dir)
    manifest = build_manifest(index, 4, mu, partition="label_sorted", seed=0)
    coverage = live_coverage(manifest, index, set(range(4)) - down)
    assert coverage == pytest.approx(expected, abs=1.0 / 4 / 100)  # chunks differ by at most one sample


@pytest.mark.slow
def test_training_reports_coverage_under_failures(tmp_path, digits_dir):
    """PR-SGD loses the failed rank's chunk (coverage 0.5 at p=2), RI-SGD mu=0.5 keeps it: both runs in
    one launch (a plan), so they pay one start-up."""
    cases = {"prsgd": (0.0, 0.5), "risgd": (0.5, 1.0)}
    proc = launch_trainer(["steps=10", "tau=5", "eval_every=5", "failures=[{ranks: [1], start_round: 1}]",
                           f"data.shards={digits_dir}", f"runs_dir={tmp_path}", "wandb.enabled=false"],
                          plan=[[f"algorithm={a}", f"mu={mu}", f"run_name={a}"] for a, (mu, _) in cases.items()],
                          plan_dir=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for algorithm, (_, expected) in cases.items():
        with open(os.path.join(tmp_path, algorithm, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
        assert [m["data_coverage"] for m in metrics] == [1.0, pytest.approx(expected, abs=0.01)], algorithm
        with open(os.path.join(tmp_path, algorithm, "summary.json")) as f:
            assert json.load(f)["min_data_coverage"] == pytest.approx(expected, abs=0.01), algorithm
