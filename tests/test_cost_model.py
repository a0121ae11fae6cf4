"""The communication cost model: the ring formula, predictions and the tau recommendation; the
model sizes it takes come from risgd_models, never from the engine itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import risgd_models
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET50_BYTES = 102440608  # fp32 parameters + BatchNorm statistics of timm's resnet50: 97.7 MiB


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The documented command, in a fresh process (where only timm's own models are registered)."""
    return subprocess.run([sys.executable, "-m", "risgd_ext.cost_model", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _prediction(stdout: str) -> list[str]:
    """The command's own lines, from its header on (DeepSpeed may log to stdout before it)."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if " per all-reduce; " in line), len(lines))
    return lines[start:]


def test_model_bytes_from_the_model_zoo():
    assert risgd_models.model_bytes("resnet50") == RESNET50_BYTES
    model = risgd_models.create_model("resnet20_cifar", num_classes=10)
    floats = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    assert risgd_models.model_bytes("resnet20_cifar") == 4 * sum(t.numel() for t in floats)
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        risgd_models.model_bytes("no_such_model")


def test_importing_the_cost_model_loads_no_model_zoo():
    code = ("import sys, risgd_ext.cost_model; "
            "print(sorted(m for m in ('risgd_models', 'timm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_cli_with_model_bytes(capsys):
    nbytes = risgd_models.model_bytes("resnet20_cifar")
    # --model-bytes takes precedence: the name is not even looked up
    assert main(["--nodes", "8", "--model", "no_such_model", "--model-bytes", str(nbytes), "--bandwidth-gbit", "1",
                 "--compute-ms", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{nbytes} bytes: ") and "8 ranks at 1 Gbit/s" in out
    expected = predict(0.02, nbytes, 8, 1.0, 50e-6, 50, 0.1)
    assert f"recommended_tau    {expected.recommended_tau}" in out
    assert f"sync_comm_share    {expected.sync_comm_share:.4f}" in out


def test_cli_resnet50_prints_the_documented_numbers():
    proc = _cli("--nodes", "8", "--model", "resnet50", "--bandwidth-gbit", "10", "--compute-ms", "120")
    assert proc.returncode == 0, proc.stderr
    lines = _prediction(proc.stdout)
    assert lines[0] == ("resnet50: 97.7 MiB per all-reduce; 8 ranks at 10 Gbit/s, 50 us latency, "
                        "120 ms compute per step")
    for line in ("sync_comm_share    0.5457", "risgd_comm_share   0.0235", "speedup_per_step   2.1493",
                 "recommended_tau    11"):
        assert f"  {line}" in lines, proc.stdout
    same = _cli("--nodes", "8", "--model-bytes", str(RESNET50_BYTES), "--bandwidth-gbit", "10", "--compute-ms", "120")
    assert _prediction(same.stdout)[1:] == lines[1:]


def test_cli_refuses_a_model_timm_does_not_know():
    proc = _cli("--nodes", "8", "--model", "resnet44_cifar", "--bandwidth-gbit", "10", "--compute-ms", "120")
    assert proc.returncode == 2 and _prediction(proc.stdout) == []
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: unknown model 'resnet44_cifar' for timm: pass --model-bytes N "
        "(python -c \"import risgd_models; print(risgd_models.model_bytes('resnet44_cifar'))\")")


@pytest.mark.parametrize("bad", [["--model-bytes", "0"], ["--bandwidth-gbit", "0"], ["--tau", "0"],
                                 ["--target-share", "1"]])
def test_cli_refuses_out_of_range_values(capsys, bad):
    args = {"--nodes": "8", "--bandwidth-gbit": "1", "--compute-ms": "20", "--model-bytes": "1000"}
    args.update(dict([bad]))
    with pytest.raises(SystemExit) as exit_:
        main([x for kv in args.items() for x in kv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad[0]} ") and err.count("\n") == 1


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
    measured = advise(stats, 0.0, 0.0, 0.1, 50)
    assert measured["bandwidth_source"] == "measured" and measured["bandwidth_gbit"] == pytest.approx(0.008)
    assert measured["allreduce_s"] == pytest.approx(transfer) and measured["tau"] == 50
    given = advise(stats, 0.016, 0.0, 0.1, tau=10)
    assert given["bandwidth_source"] == "given" and given["allreduce_s"] == pytest.approx(transfer / 2)
    assert given["risgd_step_s"] == pytest.approx(0.01 + transfer / 2 / 10)
    alone = advise({**stats, "world_size": 1}, 0.0, 0.0, 0.1, 50)  # one rank: nothing to predict, valid JSON
    assert alone["bandwidth_gbit"] is None and "allreduce_s" not in alone


def test_advise_takes_tau_from_the_caller():
    stats = {"steps": 100, "world_size": 4, "comm_rounds": 100, "compute_seconds": 1.0, "bytes_allreduced": 1e8,
             "comm_seconds": 3.0, "tau": 1}  # a synchronous run: its own tau says nothing about RI-SGD's
    assert advise(stats, 1.0, 0.0, 0.1, 20)["tau"] == 20
    with pytest.raises(TypeError):
        advise(stats, 1.0, 0.0, 0.1)  # no hidden default
    for bad in (None, 0, 2.5):
        with pytest.raises(ValueError, match="tau must be an int >= 1"):
            advise(stats, 1.0, 0.0, 0.1, bad)


def test_per_chunk_compute_enters_the_risgd_step():
    p = predict(compute_s=0.1, model_bytes=1e8, ranks=8, bandwidth_gbit=10, latency_s=0.0, tau=50,
                risgd_compute_s=0.3)
    assert p.local_step_s == 0.3 and p.risgd_step_s == pytest.approx(0.3 + p.allreduce_s / 50)
    assert p.sync_step_s == pytest.approx(0.1 + p.allreduce_s)
