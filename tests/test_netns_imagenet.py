"""The ImageNet recipe's whole path at small scale on 2 namespace hosts x 2 ranks (needs root and
`ip netns`; skipped with the reason otherwise): synthetic ILSVRC-layout JPEGs -> make_shards ->
manifest -> per-host replication -> timm ResNet-50 with bf16 autocast -> every rank's digest equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from risgd_hosts.netns_cluster import netns_available

pytestmark = [pytest.mark.slow, pytest.mark.netns]  # `make quick` leaves these out (see pyproject's markers)

WHY = netns_available()


@pytest.mark.skipif(WHY is not None, reason=f"network namespaces unavailable: {WHY}")
def test_imagenet_recipe_end_to_end_on_two_hosts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "-m", "hosts.imagenet_e2e", "--work-dir", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every rank's model digest equal: yes" in proc.stdout
    with open(tmp_path / "runs" / "imagenet-e2e" / "summary.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 4 and summary["comm_rounds"] == 2 and summary["mu"] == 0.25
    assert len(set(summary["rank_model_sha256"])) == 1
    with open(tmp_path / "runs" / "imagenet-e2e" / "ds_config.json") as f:
        assert json.load(f)["torch_autocast"]["dtype"] == "bfloat16"  # the recipe's precision


def test_bad_arguments_exit_2():
    proc = subprocess.run([sys.executable, "-m", "hosts.imagenet_e2e", "--work-dir", "x", "--steps", "3"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
