"""The communication cost model: the ring formula, predictions and the tau recommendation."""

from __future__ import annotations

import pytest

from risgd_ext.cost_model import main, predict, recommend_tau, ring_allreduce_seconds


def test_ring_allreduce_formula():
    # 2(N-1) latencies + 2(N-1)/N * bytes / bandwidth
    assert ring_allreduce_seconds(100e6, 4, 1e9, 1e-4) == pytest.approx(6e-4 + 1.5 * 0.1)
    assert ring_allreduce_seconds(100e6, 1, 1e9, 1e-4) == 0.0


def test_prediction_and_recommended_tau():
    p = predict(compute_s=0.1, model_bytes=100e6, ranks=8, bandwidth_gbit=8.0, latency_s=0.0, tau=50,
                target_share=0.1)
    allreduce = 2 * 7 / 8 * 100e6 / 1e9
    assert p.allreduce_s == pytest.approx(allreduce)
    assert p.sync_step_s == pytest.approx(0.1 + allreduce)
    assert p.risgd_step_s == pytest.approx(0.1 + allreduce / 50)
    assert p.sync_comm_share == pytest.approx(allreduce / (0.1 + allreduce))
    tau = p.recommended_tau
    share = lambda t: (allreduce / t) / (0.1 + allreduce / t)  # noqa: E731
    assert share(tau) <= 0.1 < share(tau - 1)  # the smallest tau that meets the target
    assert recommend_tau(0.1, 0.0, 0.1) == 1


def test_cli(capsys):
    assert main(["--nodes", "8", "--model", "resnet20_cifar", "--bandwidth-gbit", "1", "--compute-ms", "20"]) == 0
    out = capsys.readouterr().out
    assert "recommended_tau" in out and "8 ranks at 1 Gbit/s" in out
