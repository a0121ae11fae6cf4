"""The communication cost model: the ring formula, predictions and the tau recommendation."""

from __future__ import annotations

import pytest

from risgd_ext.cost_model import (
    advise,
    effective_bandwidth,
    main,
    predict,
    predict_run_seconds,
    recommend_tau,
    ring_allreduce_seconds,
    ring_seconds,
)


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


def test_alpha_beta_round_trips():
    ranks, bandwidth, latency = 4, 1.25e6, 2e-3
    measured = ring_seconds(3e6, ranks, bandwidth, latency, collectives=10)
    assert measured == pytest.approx(10 * 6 * latency + 1.5 * 3e6 / bandwidth)
    assert effective_bandwidth(measured, 3e6, 10, ranks, latency) == pytest.approx(bandwidth)
    assert predict_run_seconds(0.02, 100, 3e6, 10, ranks, bandwidth, latency) == pytest.approx(2.0 + measured)
    assert effective_bandwidth(10 * 6 * latency, 3e6, 10, ranks, latency) == float("inf")  # latency explains all


def test_advise_from_engine_stats():
    # 100 steps of 10 ms compute and 2 rounds of 1 MB at a measured 8 Mbit/s on 4 ranks (no latency)
    transfer = 1.5 * 1e6 / 1e6
    stats = {"steps": 100, "world_size": 4, "comm_rounds": 2, "compute_seconds": 1.0, "bytes_allreduced": 2e6,
             "comm_seconds": 2 * transfer, "tau": 50}
    measured = advise(stats, 0.0, 0.0)
    assert measured["bandwidth_source"] == "measured" and measured["bandwidth_gbit"] == pytest.approx(0.008)
    assert measured["allreduce_s"] == pytest.approx(transfer) and measured["tau"] == 50
    given = advise(stats, 0.016, 0.0, tau=10)
    assert given["bandwidth_source"] == "given" and given["allreduce_s"] == pytest.approx(transfer / 2)
    assert given["risgd_step_s"] == pytest.approx(0.01 + transfer / 2 / 10)
    alone = advise({**stats, "world_size": 1}, 0.0, 0.0)  # one rank: nothing to predict, and valid JSON
    assert alone["bandwidth_gbit"] is None and "allreduce_s" not in alone


def test_per_chunk_compute_enters_the_risgd_step():
    p = predict(compute_s=0.1, model_bytes=1e8, ranks=8, bandwidth_gbit=10, latency_s=0.0, tau=50,
                risgd_compute_s=0.3)
    assert p.local_step_s == 0.3 and p.risgd_step_s == pytest.approx(0.3 + p.allreduce_s / 50)
    assert p.sync_step_s == pytest.approx(0.1 + p.allreduce_s)
