"""Failed workers (paper, section 4.4): how much of the data the live ranks still hold, in the
manifest and in a real training run."""

from __future__ import annotations

import json
import os

import pytest

from risgd_data.index import load_index
from risgd_data.manifest import build_manifest, live_coverage
from tests.test_train import launch


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
@pytest.mark.parametrize("algorithm, mu, expected", [("prsgd", 0.0, 0.5), ("risgd", 0.5, 1.0)])
def test_training_reports_coverage_under_failures(tmp_path, digits_dir, algorithm, mu, expected):
    proc = launch([f"algorithm={algorithm}", f"mu={mu}", "steps=10", "tau=5", "eval_every=5",
                   "failures=[{ranks: [1], start_round: 1}]", f"data.shards={digits_dir}", f"runs_dir={tmp_path}",
                   "run_name=run", "wandb.enabled=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["data_coverage"] for m in metrics] == [1.0, pytest.approx(expected, abs=0.01)]
    with open(os.path.join(tmp_path, "run", "summary.json")) as f:
        assert json.load(f)["min_data_coverage"] == pytest.approx(expected, abs=0.01)
