"""The planner (risgd_planner, formerly the engine's cost model): the ring formula, predictions and the
tau recommendation, the one-line answer and its command line; the model sizes it takes come from
risgd_models, never from the engine itself."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
from helpers import ROOT

import risgd_models
from risgd_planner import (
    RoundParts,
    advise,
    effective_bandwidth,
    exposed_round_seconds,
    exposed_seconds,
    hierarchical_round_parts,
    hierarchical_round_seconds,
    main,
    predict,
    predict_hierarchical,
    predict_hierarchical_run_seconds,
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


RESNET50_BYTES = 102440608  # fp32 parameters + BatchNorm statistics of timm's resnet50: 97.7 MiB


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The documented command, in a fresh process (where only timm's own models are registered)."""
    return subprocess.run([sys.executable, "-m", "risgd_planner", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _prediction(stdout: str) -> list[str]:
    """The command's own lines, from its header on (DeepSpeed may log to stdout before it)."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if " per all-reduce; " in line), len(lines))
    return lines[start:]


def _numbers(lines: list[str]) -> list[str]:
    """The lines without what each number assumes: ``  key   value  (note)`` -> ``  key   value``."""
    return [line.split("  (", 1)[0] for line in lines]


def test_model_bytes_from_the_model_zoo():
    assert risgd_models.model_bytes("resnet50") == RESNET50_BYTES
    model = risgd_models.create_model("resnet20_cifar", num_classes=10)
    floats = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    assert risgd_models.model_bytes("resnet20_cifar") == 4 * sum(t.numel() for t in floats)
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        risgd_models.model_bytes("no_such_model")


def test_importing_the_cost_model_loads_no_model_zoo():
    code = ("import sys, risgd_planner; "
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
    assert out.startswith(f"{nbytes} bytes: ") and "8 nodes of 1 rank at 1 Gbit/s" in out
    expected = predict(0.02, nbytes, 8, 1.0, 50e-6, 50, 0.1)
    assert f"recommended_tau    {expected.recommended_tau}" in out
    assert f"sync_comm_share    {expected.sync_comm_share:.4f}" in out


def test_cli_resnet50_prints_the_documented_numbers():
    proc = _cli("--nodes", "8", "--model", "resnet50", "--bandwidth-gbit", "10", "--compute-ms", "120")
    assert proc.returncode == 0, proc.stderr
    lines = _prediction(proc.stdout)
    assert lines[0] == ("resnet50: 97.7 MiB per all-reduce; 8 nodes of 1 rank at 10 Gbit/s, 50 us latency, "
                        "120 ms compute per step")
    for line in ("sync_comm_share    0.5457", "risgd_comm_share   0.0235", "speedup_per_step   2.1493",
                 "recommended_tau    11"):
        assert f"  {line}" in _numbers(lines), proc.stdout
    same = _cli("--nodes", "8", "--model-bytes", str(RESNET50_BYTES), "--bandwidth-gbit", "10", "--compute-ms", "120")
    assert _prediction(same.stdout)[1:-1] == lines[1:-1]
    # the answer's command runs the project's ResNet-50 recipe for --model resnet50, a placeholder for bytes alone
    recipe = "--recipe recipes/imagenet_resnet50.yaml node_size=1 compress=none tau=11"
    assert lines[-1].endswith(recipe) and _prediction(same.stdout)[-1] == lines[-1].replace(
        "recipes/imagenet_resnet50.yaml", "RECIPE.yaml")


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


# -- node hierarchy and overlapped averaging -----------------------------------------------------------

def test_hierarchical_round_by_hand():
    # S = 8 MB, M = 4 nodes of k = 2 ranks; inter 1 GB/s, 100 us; intra 4 GB/s, 10 us
    # cross: 2*3*100us + 2*3/4 * 8e6/1e9 = 0.0006 + 0.012 = 0.0126
    # bcast: k(k-1)*10us + 8e6/4e9       = 0.00002 + 0.002 = 0.00202
    # intra (not node-synchronous): 2*1*10us + 2*1/2 * 8e6/4e9 = 0.00202
    args = (8e6, 4, 2, 1e9, 1e-4, 4e9, 1e-5)
    assert hierarchical_round_seconds(*args) == pytest.approx(0.01462)
    assert hierarchical_round_seconds(*args, node_synchronous=True) == pytest.approx(0.01462)
    assert hierarchical_round_seconds(*args, node_synchronous=False) == pytest.approx(0.01664)
    # M = 2 nodes of k = 4; intra 8 GB/s: cross 2*1*100us + 1 * 8e6/1e9 = 0.0082,
    # bcast 4*3*10us + 8e6/8e9 = 0.00112, intra 2*3*10us + 2*3/4 * 8e6/8e9 = 0.00156
    assert hierarchical_round_seconds(8e6, 2, 4, 1e9, 1e-4, 8e9, 1e-5) == pytest.approx(0.00932)
    assert hierarchical_round_seconds(8e6, 2, 4, 1e9, 1e-4, 8e9, 1e-5, False) == pytest.approx(0.01088)
    # one node: no cross-node ring, the broadcasts remain
    assert hierarchical_round_seconds(8e6, 1, 4, 1e9, 1e-4, 8e9, 1e-5) == pytest.approx(0.00112)
    # an infinitely fast, latency-free node link (the defaults): the cross-node ring alone
    assert hierarchical_round_seconds(8e6, 4, 2, 1e9, 1e-4) == pytest.approx(0.0126)
    for bad in ((8e6, 0, 2, 1e9, 0.0), (8e6, 4, 0, 1e9, 0.0), (8e6, 4, 1.5, 1e9, 0.0)):
        with pytest.raises(ValueError):
            hierarchical_round_seconds(*bad)


@pytest.mark.parametrize("nbytes,nodes,bandwidth,latency", [(8e6, 4, 1e9, 1e-4), (3e6, 7, 1.25e6, 2e-3),
                                                             (1e8, 1, 1e9, 1e-4), (0.0, 5, 1e9, 5e-5)])
def test_one_rank_per_node_is_the_flat_ring(nbytes, nodes, bandwidth, latency):
    flat = ring_seconds(nbytes, nodes, bandwidth, latency)
    for synchronous in (True, False):  # no node to average inside, no slices to broadcast
        assert hierarchical_round_seconds(nbytes, nodes, 1, bandwidth, latency, 1e3, 1.0, synchronous) == flat
    assert hierarchical_round_seconds(8e6, 4, 1, 1e9, 1e-4) == pytest.approx(0.0126)  # by hand, above


def test_exposed_seconds():
    assert exposed_seconds(0.5, 0.8) == 0.0  # the window hides the whole transfer
    assert exposed_seconds(0.5, 0.5) == 0.0
    assert exposed_seconds(0.5, 0.2) == pytest.approx(0.3)  # round - window
    assert exposed_seconds(0.5, 0.0) == 0.5


def test_round_phases_and_what_overlap_hides():
    # the round by hand above: intra 0.00202, cross 0.0126, bcast 0.00202
    parts = hierarchical_round_parts(8e6, 4, 2, 1e9, 1e-4, 4e9, 1e-5, node_synchronous=False)
    assert parts == pytest.approx(RoundParts(0.00202, 0.0126, 0.00202))
    assert hierarchical_round_parts(8e6, 4, 2, 1e9, 1e-4, 4e9, 1e-5).intra == 0.0  # node-synchronous
    # only the cross-node all-reduce runs in the background; the intra-node phases block
    assert exposed_round_seconds(parts, 0.02) == pytest.approx(0.00404)  # cross hidden
    assert exposed_round_seconds(parts, 0.01) == pytest.approx(0.00404 + 0.0026)  # cross - window exposed
    assert exposed_round_seconds(parts, 0.02, overlap=False) == pytest.approx(0.01664)  # all of it
    # one rank per node: the round is the flat ring, exposed = max(0, round - window)
    flat = hierarchical_round_parts(8e6, 4, 1, 1e9, 1e-4)
    assert flat == pytest.approx(RoundParts(0.0, 0.0126, 0.0))
    assert exposed_round_seconds(flat, 0.02) == 0.0 and exposed_round_seconds(flat, 0.01) == pytest.approx(0.0026)


def test_hierarchical_run_reduces_to_the_flat_run():
    # 100 steps of 20 ms, 10 rounds of 3 MB on 4 ranks at 1.25 MB/s, 2 ms: 2.0 + 10 * (6*2ms + 1.5*3e6/1.25e6)
    flat = predict_run_seconds(0.02, 100, 3e7, 10, 4, 1.25e6, 2e-3)
    hier = predict_hierarchical_run_seconds(0.02, 100, 3e6, 10, 4, 1, 1.25e6, 2e-3)
    assert hier == pytest.approx(flat) and hier == pytest.approx(38.12)


def test_hierarchical_run_by_hand():
    # 100 steps of 10 ms; 4 rounds of 8 MB over 4 nodes of 2 ranks (round 0.01462 s node-synchronous,
    # 0.01664 s otherwise, as above); an intra-node all-reduce of 8 MB over 2 ranks: 0.00202 s
    net = dict(intra_bandwidth_bytes_s=4e9, intra_latency_s=1e-5)
    run = lambda **kw: predict_hierarchical_run_seconds(0.01, 100, 8e6, 4, 4, 2, 1e9, 1e-4, **net, **kw)  # noqa: E731
    synchronous = dict(grad_allreduces=100, grad_allreduce_bytes=8e6)
    assert run(**synchronous) == pytest.approx(1.0 + 0.202 + 4 * 0.01462)  # 1.26048
    # overlapped behind 1 step (10 ms): 4.62 ms of each round exposed, the last round in full
    assert run(**synchronous, overlap=True, delay_steps=1) == pytest.approx(1.0 + 0.202 + 3 * 0.00462 + 0.01462)
    # behind 2 steps (20 ms > the 12.6 ms cross-node phase): the broadcasts (2.02 ms) block, the last round in full
    assert run(**synchronous, overlap=True, delay_steps=2) == pytest.approx(1.0 + 0.202 + 3 * 0.00202 + 0.01462)
    # one rank per node, behind 2 steps: only the last round (12.6 ms) is waited for
    assert predict_hierarchical_run_seconds(0.01, 100, 8e6, 4, 4, 1, 1e9, 1e-4, overlap=True,
                                            delay_steps=2) == pytest.approx(1.0 + 0.0126)
    assert run(**synchronous, overlap=True, delay_steps=1, round_overhead_s=0.001) == pytest.approx(1.23448)
    # tau_intra > 0: 16 intra-node averages besides the 4 rounds, which average inside the node first
    assert run(node_synchronous=False, intra_rounds=16) == pytest.approx(1.0 + 16 * 0.00202 + 4 * 0.01664)
    assert predict_hierarchical_run_seconds(0.01, 100, 8e6, 0, 4, 2, 1e9, 1e-4, overlap=True,
                                            delay_steps=5) == pytest.approx(1.0)  # no rounds: compute alone
    with pytest.raises(ValueError, match="delay_steps"):
        run(overlap=True)


def test_hierarchical_step_prediction_by_hand():
    # 100 ms compute, 1e8 bytes, 4 nodes of 2 ranks, inter 8 Gbit/s (1 GB/s), intra 32 Gbit/s (4 GB/s), no latency
    # round (node-synchronous): 2*3/4 * 1e8/1e9 + 1e8/4e9 = 0.15 + 0.025 = 0.175; gradient all-reduce 1e8/4e9 = 0.025
    h = lambda **kw: predict_hierarchical(0.1, 1e8, 4, 2, 8.0, 0.0, 10, intra_bandwidth_gbit=32.0,  # noqa: E731
                                          intra_latency_s=0.0, **kw)
    p = h()
    assert p.round_s == pytest.approx(0.175) and p.intra_step_comm_s == pytest.approx(0.025)
    assert p.exposed_round_s == pytest.approx(0.175)
    assert p.hier_step_s == pytest.approx(0.1 + 0.025 + 0.0175)  # 0.1425
    assert p.hier_comm_share == pytest.approx(0.0425 / 0.1425)
    # flat over 8 ranks: all-reduce 2*7/8 * 0.1 = 0.175, sync step 0.275, RI-SGD step 0.1 + 0.0175
    assert p.speedup_vs_sync == pytest.approx(0.275 / 0.1425)
    assert p.speedup_vs_risgd == pytest.approx(0.1175 / 0.1425)
    hidden = h(overlap=True)  # behind tau = 10 steps, 1 s of compute: the cross-node phase, not the broadcasts
    assert hidden.exposed_round_s == pytest.approx(0.025) and hidden.hier_step_s == pytest.approx(0.1275)
    one = h(overlap=True, overlap_delay=1)  # behind one step: broadcasts 0.025 + cross 0.15 - 0.1
    assert one.exposed_round_s == pytest.approx(0.075) and one.hier_step_s == pytest.approx(0.1325)
    assert h(overlap=True, overlap_delay=1, round_overhead_s=0.01).exposed_round_s == pytest.approx(0.085)
    # tau_intra 3 in a round of 10: 3 intra averages (steps 3, 6, 9) of 0.025; the round averages inside first
    intra = h(tau_intra=3)
    assert intra.round_s == pytest.approx(0.2) and intra.intra_step_comm_s == pytest.approx(0.0075)
    assert intra.hier_step_s == pytest.approx(0.1 + 0.0075 + 0.02)


def _main_lines(capsys, *args: str) -> list[str]:
    assert main(list(args)) == 0
    return capsys.readouterr().out.splitlines()


# The numbers the command printed before the hierarchy flags existed, for these arguments (each line now
# also says, after its number, what the number assumes).
FLAT = ["--nodes", "4", "--model-bytes", "1000000", "--bandwidth-gbit", "1", "--compute-ms", "20",
        "--risgd-compute-ms", "30", "--tau", "10", "--latency-us", "0"]
FLAT_OUTPUT = ["1000000 bytes: 1.0 MiB per all-reduce; 4 nodes of 1 rank at 1 Gbit/s, 0 us latency, 20 ms compute "
               "per step",
               "  allreduce_s        0.0120", "  sync_step_s        0.0320", "  local_step_s       0.0300",
               "  risgd_step_s       0.0312", "  sync_comm_share    0.3750", "  risgd_comm_share   0.0385",
               "  speedup_per_step   1.0256", "  recommended_tau    4"]


def test_cli_defaults_print_what_they_printed(capsys):
    lines = _main_lines(capsys, *FLAT)
    assert _numbers(lines[:-1]) == FLAT_OUTPUT and lines[-1].startswith("answer: ")
    assert _main_lines(capsys, *FLAT, "--ranks-per-node", "1", "--tau-intra", "0", "--intra-bandwidth-gbit", "40",
                       "--intra-latency-us", "1") == lines


HIER = ["--nodes", "4", "--ranks-per-node", "2", "--model-bytes", "100000000", "--bandwidth-gbit", "8",
        "--latency-us", "0", "--compute-ms", "100", "--tau", "10", "--intra-bandwidth-gbit", "32",
        "--intra-latency-us", "0"]


def test_cli_hierarchy_and_overlap(capsys):
    lines = _main_lines(capsys, *HIER)
    flat = _main_lines(capsys, "--nodes", "8", *HIER[4:14])  # the same model, network, compute and tau
    assert _numbers(lines[1:9]) == _numbers(flat[1:9])  # the flat numbers: one ring over all 4 x 2 ranks
    assert lines[0].startswith("100000000 bytes: 95.4 MiB per all-reduce; 4 nodes x 2 ranks (8 ranks) at 8 Gbit/s")
    assert lines[9] == ("hierarchical/overlapped: 4 nodes x 2 ranks, 32 Gbit/s and 0 us latency inside a node, "
                        "node-synchronous (tau_intra 0), tau 10, no overlap")
    # the node's gradient all-reduce every step (25 ms of a 125 ms step) alone exceeds the 10% target
    assert _numbers(lines[10:-1]) == [
        "  round_s            0.1750", "  intra_step_comm_s  0.0250", "  exposed_round_s    0.1750",
        "  hier_step_s        0.1425", "  hier_comm_share    0.2982", "  speedup_vs_sync    1.9298",
        "  speedup_vs_risgd   0.8246", "  hier_recommended_tau none"]
    over = _main_lines(capsys, *HIER, "--overlap", "--overlap-delay", "1")
    assert over[9].endswith("node-synchronous (tau_intra 0), tau 10, overlap delay 1 steps")
    assert "  exposed_round_s    0.0750" in _numbers(over) and "  hier_step_s        0.1325" in _numbers(over)
    intra = _main_lines(capsys, *HIER, "--tau-intra", "3")
    assert intra[9].endswith("tau_intra 3, tau 10, no overlap") and "  hier_step_s        0.1275" in _numbers(intra)
    # overlap alone: one rank per node, the round is the flat ring, hidden behind tau = 10 steps
    alone = _main_lines(capsys, "--nodes", "8", *HIER[4:14], "--overlap")
    assert alone[9].startswith("hierarchical/overlapped: 8 nodes x 1 ranks, ")
    assert alone[9].endswith(", tau 10, overlap delay 10 steps")
    assert "  round_s            0.1750" in _numbers(alone) and "  hier_step_s        0.1000" in _numbers(alone)


@pytest.mark.parametrize("bad,flag", [
    (["--ranks-per-node", "0"], "--ranks-per-node"), (["--ranks-per-node", "two"], "argument --ranks-per-node:"),
    (["--ranks-per-node", "2", "--tau-intra", "-1"], "--tau-intra"), (["--tau-intra", "2"], "--tau-intra"),
    (["--intra-bandwidth-gbit", "0"], "--intra-bandwidth-gbit"), (["--intra-latency-us", "-1"], "--intra-latency-us"),
    (["--overlap", "--overlap-delay", "0"], "--overlap-delay"),
    (["--overlap", "--overlap-delay", "11"], "--overlap-delay"),  # FLAT's tau is 10
    (["--overlap-delay", "3"], "--overlap-delay"), (["--compress", "top"], "argument --compress:"),
    (["--compress", "topk0.9"], "argument --compress:")])
def test_cli_refuses_bad_hierarchy_values(capsys, bad, flag):
    with pytest.raises(SystemExit) as exit_:
        main([*FLAT, *bad])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {flag} ") and captured.err.count("\n") == 1


STATS = {"steps": 100, "world_size": 8, "comm_rounds": 10, "compute_seconds": 10.0, "bytes_allreduced": 1e9,
         "comm_seconds": 1.75, "tau": 10}


def test_advise_without_hierarchy_keys_is_unchanged():
    keys = {"bandwidth_gbit", "bandwidth_source", "latency_us", "ranks", "tau", "compute_s_per_step",
            "bytes_per_allreduce", "allreduce_s", "sync_step_s", "local_step_s", "risgd_step_s", "sync_comm_share",
            "risgd_comm_share", "speedup_per_step", "recommended_tau"}
    plain = advise(STATS, 8.0, 0.0, 0.1, 10)
    assert set(plain) == keys
    assert advise({**STATS, "node_size": 1, "tau_intra": 0, "overlap": False, "overlap_delay": 10}, 8.0, 0.0, 0.1,
                  10) == plain
    assert advise(STATS, 8.0, 0.0, 0.1, 10, intra_bandwidth_gbit=1.0) == plain


def test_advise_hierarchy_and_overlap():
    # 4 nodes of 2 ranks, 0.1 s compute per step, 1e8 bytes per all-reduce: the numbers worked out above
    stats = {**STATS, "node_size": 2, "tau_intra": 0, "overlap": True, "overlap_delay": 1, "comm_wait_seconds": 0.75}
    out = advise(stats, 8.0, 0.0, 0.1, 10, intra_bandwidth_gbit=32.0, intra_latency_s=0.0)
    assert out["allreduce_s"] == pytest.approx(0.175)  # the flat prediction stays
    config = (out["node_size"], out["nodes"], out["tau_intra"], out["overlap"], out["overlap_delay"])
    assert config == (2, 4, 0, True, 1)
    assert out["comm_wait_s_per_step"] == pytest.approx(0.0075)
    assert out["round_s"] == pytest.approx(0.175) and out["exposed_round_s"] == pytest.approx(0.075)
    assert out["hier_step_s"] == pytest.approx(0.1325)
    # overlap alone, its delay not reported: tau steps, which hide the whole round here
    alone = advise({**STATS, "overlap": True}, 8.0, 0.0, 0.1, 10)
    assert alone["node_size"] == 1 and alone["overlap_delay"] == 10 and "comm_wait_s_per_step" not in alone
    assert alone["round_s"] == pytest.approx(alone["allreduce_s"]) and alone["hier_step_s"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="not a multiple of node_size"):
        advise({**STATS, "node_size": 3}, 8.0, 0.0, 0.1, 10)


def test_compressed_payloads_and_their_collective(monkeypatch):
    from risgd_planner import payload_bytes, recommend_rounds, ring_allreduce_seconds, round_seconds

    s = 4 * 1024 * 256  # 262,144 values
    assert payload_bytes(s, "none") == s and payload_bytes(s, "bf16") == s / 2
    assert payload_bytes(s, "int8") == 262144 + 4 * 1024  # values + one fp32 scale per 256
    assert s / payload_bytes(s, "int8") >= 3.9
    bw = 1e6
    assert round_seconds(s, 4, bw, 0.0) == ring_allreduce_seconds(s, 4, bw, 0.0)
    assert s / payload_bytes(s, "int4") >= 7.5 and payload_bytes(s, "int4") == 262144 / 2 + 4 * 2048
    for n in (2, 4, 8, 16):  # the two-phase round moves 2(N-1)/N of the payload, as the ring does the model
        for codec, at_least in (("bf16", 1.95), ("int8", 3.9), ("int4", 7.0)):
            ratio = round_seconds(s, n, bw, 0.0) / round_seconds(s, n, bw, 0.0, codec)
            assert ratio == pytest.approx(s / payload_bytes(s, codec), rel=1e-9) and ratio >= at_least
    _, two = recommend_rounds(0.1, 98 * 2**20, 2, 0.1, 50e-6)
    _, eight = recommend_rounds(0.1, 98 * 2**20, 8, 0.1, 50e-6)
    # flat rounds: the smallest payload measured on flat rounds wins at every number of nodes: int4 (int2 was
    # measured at the node level only, flat int2 lost 1.48 pt; topk, smaller, is unmeasured)
    assert two.compress == eight.compress == "int4"
    from risgd_ext.codec import CODECS

    options, _ = recommend_rounds(0.1, 98 * 2**20, 8, 0.1, 50e-6)  # listed, never picked
    assert "int2" in [o.compress for o in options] and not CODECS["int2"].measured_on("flat")
    assert CODECS["int2"].measured_on("node") and CODECS["int4"].measured_on("flat") and CODECS["int4"].measured_on(
        "node") and not CODECS["topk"].measured_on("node")
    monkeypatch.setattr(CODECS["int2"], "accuracy_measured", True)  # measured on both shapes: it would win
    _, eight = recommend_rounds(0.1, 98 * 2**20, 8, 0.1, 50e-6)
    assert eight.compress == "int2"


# -- what each printed number assumes; taus beyond the measured range; the node level's tau ---------------

EXAMPLE = ["--nodes", "8", "--bandwidth-gbit", "0.1", "--compute-ms", "120"]  # ResNet-50 on a 0.1 Gbit/s link


def _line(lines: list[str], key: str) -> str:
    """The one line for ``key`` (the ``  key   value  (what it assumes)`` format)."""
    found = [line for line in lines if line.split()[:1] == [key]]
    assert len(found) == 1, (key, lines)
    return found[0]


def test_cli_says_what_the_numbers_assume_and_flags_a_tau_beyond_the_measured_range():
    from risgd_planner import MEASURED_TAU_MAX

    assert MEASURED_TAU_MAX == 200
    proc = _cli(*EXAMPLE, "--model", "resnet50")  # the issue's command
    assert proc.returncode == 0, proc.stderr
    lines = _prediction(proc.stdout)
    share = _line(lines, "risgd_comm_share")
    assert share.startswith("  risgd_comm_share   0.7050  (") and "--tau 50" in share  # the tau it assumes
    tau = _line(lines, "recommended_tau")
    assert tau.startswith("  recommended_tau    1076  (") and "10%" in tau and "--target-share 0.1" in tau
    assert "one gradient all-reduce per step over the 8 nodes" in _line(lines, "sync_comm_share")
    assert "one gradient all-reduce per step over the 8 nodes" in _line(lines, "sync_step_s")
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1, lines
    assert warnings[0].startswith("warning: recommended_tau 1076 is 5.4x beyond the largest tau measured for "
                                  "accuracy (200, where accuracy already falls)")  # 1076 / 200 = 5.38
    for remedy in ("--bandwidth-gbit", "--compress", "--ranks-per-node", "--overlap", "--target-share"):
        assert remedy in warnings[0]


def test_cli_within_the_measured_range_prints_no_warning(capsys):
    lines = _main_lines(capsys, "--nodes", "8", "--model-bytes", str(RESNET50_BYTES), "--bandwidth-gbit", "10",
                        "--compute-ms", "120")
    assert _line(lines, "recommended_tau").startswith("  recommended_tau    11  (smallest tau with communication "
                                                       "<= 10% of")
    assert not [line for line in lines if "warning" in line]
    # a --tau beyond it is flagged too, even where the recommendation is within it
    lines = _main_lines(capsys, "--nodes", "8", "--model-bytes", str(RESNET50_BYTES), "--bandwidth-gbit", "10",
                        "--compute-ms", "120", "--tau", "400")
    assert "--tau 400" in _line(lines, "risgd_comm_share")
    assert [line for line in lines if line.startswith("warning:")] == [
        line for line in lines if line.startswith("warning: --tau 400 is 2.0x beyond the largest tau measured for "
                                                  "accuracy (200, where accuracy already falls)")]
    assert len([line for line in lines if line.startswith("warning:")]) == 1


def test_cli_node_level_recommends_a_tau(capsys):
    node = [*EXAMPLE, "--model-bytes", str(RESNET50_BYTES), "--ranks-per-node", "8", "--compress", "int8"]
    lines = _main_lines(capsys, *node)
    codecs = next(line for line in lines if line.startswith("rounds across the 8 nodes"))
    assert "cross-node" in codecs and "among the 8 nodes" in codecs
    # the node's gradient all-reduce every step alone is a share 0.1072 of a step: no tau reaches 10%
    none = _line(lines, "hier_recommended_tau")
    assert none.startswith("  hier_recommended_tau none  (no tau reaches hier_comm_share <= 10%")
    assert "0.1072" in none and "--tau-intra" in none and "--intra-bandwidth-gbit" in none
    lines = _main_lines(capsys, *node, "--target-share", "0.2")
    line = _line(lines, "hier_recommended_tau")
    tau = int(line.split()[1])
    # the node level's cross-node phase moves --compress's payload (the phases inside the node stay fp32)
    share = lambda t, c="int8": predict_hierarchical(0.12, RESNET50_BYTES, 8, 8, 0.1, 50e-6, t,  # noqa: E731
                                                     compress=c).hier_comm_share
    assert share(tau) <= 0.2 < share(tau - 1) and share(tau, "none") > 0.2
    assert "hier_comm_share <= 20%" in line and "--target-share 0.2" in line and "among the 8 nodes of 8 ranks" in line
    assert "the cross-node phase compressed with --compress int8, the phases inside the node fp32" in line
    assert tau == 235 and int(_line(_main_lines(capsys, *node[:-1], "none", "--target-share", "0.2"),
                                    "hier_recommended_tau").split()[1]) == 921
    factor = f"{tau / 200:.1f}x"
    assert [w for w in lines if w.startswith(f"warning: hier_recommended_tau {tau} is {factor} beyond the largest tau "
                                             "measured for accuracy (200, where accuracy already falls)")]
    # each codec's cross-node tau beyond 200 is flagged as well: fp32 and bf16 here; int8's two-phase round
    # (3.9x fewer bytes at any number of nodes) needs tau 122 at 8 nodes, within the measured range, int4's
    # (7.5x) tau 64: the recommendation (int2's tau 34 and topk's are not measured on flat rounds: never recommended)
    flagged = [w for w in lines if w.startswith("warning: tau ") and "beyond the largest tau" in w]
    assert flagged and "(bf16)" in flagged[0] and "(int8)" not in flagged[0]
    assert [w for w in lines if w.split()[:2] == ["int8", "payload"] and " tau 122 " in w + " "]
    # the rounds alone, without the node level's phases inside a node: not the answer with 8 ranks per node
    assert [w for w in lines if w.split()[:2] == ["int4", "payload"] and w.endswith("tau 64 <- smallest tau of these")]
    assert [w for w in lines if w.split()[:2] == ["int2", "payload"] and " tau 34 " in w
            and "not measured on flat" in w]
    # overlapped behind tau steps of compute: the round hides, the node level's tau is within the measured range
    over = _main_lines(capsys, *node, "--target-share", "0.2", "--overlap")
    tau = int(_line(over, "hier_recommended_tau").split()[1])
    hidden = lambda t: predict_hierarchical(0.12, RESNET50_BYTES, 8, 8, 0.1, 50e-6, t,  # noqa: E731
                                            overlap=True, compress="int8").hier_comm_share
    assert tau <= 200 and hidden(tau) <= 0.2 < hidden(tau - 1)
    assert not [w for w in over if w.startswith("warning: hier_recommended_tau")]


@pytest.mark.parametrize("kw,ranks_per_node,target", [
    (kw, k, target) for kw in ({}, {"overlap": True}, {"overlap": True, "overlap_delay": 3}, {"tau_intra": 4},
                               {"tau_intra": 3, "overlap": True}, {"round_overhead_s": 0.05})
    for k, target in ((1, 0.1), (2, 0.3), (4, 0.35)) if k > 1 or "tau_intra" not in kw])  # one rank: no average
def test_recommend_hierarchical_tau_is_the_smallest(kw, ranks_per_node, target):
    from risgd_planner import recommend_hierarchical_tau

    net = dict(intra_bandwidth_gbit=32.0, intra_latency_s=1e-5)
    args = (0.1, 1e8, 4, ranks_per_node, 8.0, 1e-4)

    def share(tau):
        delay = kw.get("overlap_delay")
        return predict_hierarchical(*args, tau, **net, **{**kw, "overlap_delay": None if delay is None else
                                                          min(delay, tau)}).hier_comm_share

    tau = recommend_hierarchical_tau(*args, target, **net, **kw)
    step = kw.get("tau_intra") or 1  # the engine's tau is a multiple of tau_intra
    valid = [t for t in range(step, 2000, step) if share(t) <= target]
    assert tau == (valid[0] if valid else None)
    assert tau is not None and tau % step == 0


def test_recommend_hierarchical_tau_none_below_the_floor():
    from risgd_planner import hierarchical_share_floor, recommend_hierarchical_tau

    # 4 nodes of 2 ranks, 100 ms compute; the node's gradient all-reduce every step: 1e8 / 4 GB/s = 25 ms,
    # a share 0.025 / 0.125 = 0.2 of a step at any tau
    args = (0.1, 1e8, 4, 2, 8.0, 0.0)
    net = dict(intra_bandwidth_gbit=32.0, intra_latency_s=0.0)
    assert hierarchical_share_floor(0.1, 1e8, 2, **net) == pytest.approx(0.2)
    assert recommend_hierarchical_tau(*args, 0.2, **net) is None
    assert recommend_hierarchical_tau(*args, 0.2, overlap=True, **net) is None
    # just above the floor: 0.1 * 0.21 / 0.79 - 0.025 = 1.58 ms per step left for the round of 175 ms: tau 111
    tau = recommend_hierarchical_tau(*args, 0.21, **net)
    share = lambda t: predict_hierarchical(*args, t, **net).hier_comm_share  # noqa: E731
    assert tau == 111 and share(tau) <= 0.21 < share(tau - 1)
    # averaging inside the node every 4 steps: 0.025 / 4 per step, a floor of 0.00625 / 0.10625
    assert hierarchical_share_floor(0.1, 1e8, 2, tau_intra=4, **net) == pytest.approx(0.00625 / 0.10625)
    assert recommend_hierarchical_tau(*args, 0.2, tau_intra=4, **net) % 4 == 0
    assert hierarchical_share_floor(0.1, 1e8, 1, **net) == 0.0  # one rank per node: nothing every step


def test_a_codec_is_one_registration_that_the_validator_and_the_cost_model_read():
    import risgd_planner as cost_model

    """Issue 34: a new codec is one class registered in risgd_ext.codec.CODECS; the risgd block's
    validator accepts it and the cost model prices its bytes from it (no formula written twice)."""
    from risgd_ext.codec import CODECS, Codec, register
    from risgd_ext.config import ConfigError, parse_block

    assert list(CODECS) == ["none", "bf16", "int8", "int4", "int2", "topk"]
    assert cost_model.payload_bytes(1024, "int8") == 256 + 4 == CODECS["int8"].nbytes(256)
    assert cost_model.payload_bytes(1024, "int4") == 128 + 8 == CODECS["int4"].nbytes(256)
    # the codecs below 4 bits (issue 44 item 2), a topk variant included: priced by the registry
    assert cost_model.payload_bytes(1024, "int2") == 64 + 8 == CODECS["int2"].nbytes(256)
    assert cost_model.payload_bytes(4096, "topk") == 6 * 32 and cost_model.payload_bytes(4096, "topk0.01") == 6 * 11
    with pytest.raises(ConfigError, match="compress must be one of none, bf16, int8, int4"):
        parse_block({"compress": "nibble"})

    @register
    class Nibble(Codec):
        name = "nibble"

        def nbytes(self, n: float) -> float:
            return n / 2 + 4

    try:
        assert parse_block({"compress": "nibble"}).compress == "nibble"
        assert cost_model.payload_bytes(4096, "nibble") == 1024 / 2 + 4
        options, _ = cost_model.recommend_rounds(0.1, 4e6, 4, 1.0, 5e-5)
        assert [o.compress for o in options] == ["none", "bf16", "int8", "int4", "int2", "topk", "nibble"]
    finally:
        del CODECS["nibble"]


# -- the planner's answer: one line, the configuration and the command that runs it (issue 46 item 9) ---------

ISSUE = ["--nodes", "16", "--model", "resnet50", "--bandwidth-gbit", "1", "--compute-ms", "150", "--ranks-per-node",
         "8", "--compress", "int8"]  # the issue's command


def _answer(lines: list[str]) -> tuple[str, list[str]]:
    """The answer line (the last, and the only one) and its command line's words."""
    assert [line for line in lines if line.startswith("answer: ")] == lines[-1:], lines
    words, run = lines[-1].split("; run: ")
    return words, shlex.split(run)


def _resolves(tokens: list[str], world_size: int, tmp_path):
    """The trainer's resolver takes the command's recipe and overrides (a manifest of its workers is the user's:
    none here, the recipe's own redundancy checked instead)."""
    from risgd_trainer.run_config import resolve_run

    assert tokens[:5] == ["deepspeed", "--hostfile", "hostfile", "train.py", "--recipe"], tokens
    return resolve_run(os.path.join(ROOT, tokens[5]), [*tokens[6:], "data.manifest=null", f"runs_dir={tmp_path}"],
                       world_size)


def test_the_answer_names_the_node_level_a_codec_a_tau_and_a_command_the_trainer_takes(capsys, tmp_path, monkeypatch):
    from risgd_ext.codec import CODECS
    from risgd_planner import flat_round_seconds, recommend_hierarchical_tau

    def by_hand(codecs):  # every measured codec, flat over the 128 ranks and at the node level
        return ({c: recommend_tau(0.15, flat_round_seconds(RESNET50_BYTES, 16, 8, 1.25e8, 50e-6, c), 0.1)
                 for c in codecs},
                {c: recommend_hierarchical_tau(0.15, RESNET50_BYTES, 16, 8, 1.0, 50e-6, 0.1, compress=c)
                 for c in codecs})

    # int2 measured at the node level (2026-12-07), not on flat rounds: its tau is 53 at the node level, the
    # smallest; flat, it is not weighed (its 53 there would tie, and the tie would go to the plainer, flat)
    flat, node = by_hand(("none", "bf16", "int8", "int4"))
    _, node2 = by_hand(("int2",))
    assert node2["int2"] == 53 < min(flat.values()) and 53 < min(node.values())
    words, tokens = _answer(_main_lines(capsys, *ISSUE))
    assert words.startswith("answer: the node level (node_size=8: 16 workers, each a node of 8 ranks), compress "
                            "int2, tau 53 (")
    assert ("no node level: " + ", ".join(f"{c} {t}" for c, t in flat.items()) + ";") in words
    assert ("node level: " + ", ".join(f"{c} {t}" for c, t in {**node, **node2}.items())) in words
    assert tokens[5:] == ["recipes/imagenet_resnet50.yaml", "node_size=8", "compress=int2", "tau=53"]
    run = _resolves(tokens, 16 * 8, tmp_path)
    assert (run.risgd.node_size, run.risgd.compress, run.risgd.tau, run.workers) == (8, "int2", 53, 16)
    # without int2 (as before its accuracy was measured) the node level wins, with int4
    monkeypatch.setattr(CODECS["int2"], "accuracy_measured", False)
    lines = _main_lines(capsys, *ISSUE)
    assert lines[0].startswith("resnet50: 97.7 MiB per all-reduce; 16 nodes x 8 ranks (128 ranks) at 1 Gbit/s")
    words, tokens = _answer(lines)
    # by hand: the smallest tau wins
    flat, node = by_hand(("none", "bf16", "int8", "int4"))
    assert node["int8"] == int(_line(lines, "hier_recommended_tau").split()[1]) == 178  # the section above
    assert min(node.values()) == node["int4"] == 95 < min(flat.values())
    assert words.startswith("answer: the node level (node_size=8: 16 workers, each a node of 8 ranks), compress "
                            "int4, tau 95 (the smallest tau with communication <= 10% of a step, --target-share 0.1,")
    assert ("no node level: " + ", ".join(f"{c} {t}" for c, t in flat.items())) in words
    assert ("node level: " + ", ".join(f"{c} {t}" for c, t in node.items())) in words
    # the command line: the project's ResNet-50 recipe (--model resnet50) with the answer's overrides
    assert tokens[5:] == ["recipes/imagenet_resnet50.yaml", "node_size=8", "compress=int4", "tau=95"]
    run = _resolves(tokens, 16 * 8, tmp_path)
    assert (run.risgd.node_size, run.risgd.compress, run.risgd.tau, run.workers) == (8, "int4", 95, 16)
    # the codec table's smallest tau is the rounds' alone (no phases inside a node): not marked recommended
    assert not [line for line in lines if line.endswith("<- recommended")]


def test_nodes_alone_are_nodes_and_the_flat_answer_runs(capsys, tmp_path):
    args = ["--nodes", "16", "--model-bytes", str(RESNET50_BYTES), "--bandwidth-gbit", "1", "--compute-ms", "150",
            "--recipe", "recipes/imagenet_resnet50.yaml"]
    lines = _main_lines(capsys, *args)
    assert lines[0] == (f"{RESNET50_BYTES} bytes: 97.7 MiB per all-reduce; 16 nodes of 1 rank at 1 Gbit/s, 50 us "
                        "latency, 150 ms compute per step")
    assert "16 ranks" not in "\n".join(lines) and "over the 16 nodes" in _line(lines, "sync_step_s")
    words, tokens = _answer(lines)
    tau = predict(0.15, RESNET50_BYTES, 16, 1.0, 50e-6, 50).recommended_tau
    assert tau == int(_line(lines, "recommended_tau").split()[1]) == 93
    assert words.startswith("answer: no node level (node_size=1: 16 workers, one per node), compress none (fp32), "
                            "tau 93 (")
    assert words.endswith("; fp32 alone: --compress int8 weighs the codecs too)")
    run = _resolves(tokens, 16, tmp_path)
    assert (run.risgd.node_size, run.risgd.compress, run.risgd.tau, run.workers) == (1, "none", 93, 16)
    # with the codecs weighed, one rank per node: the answer is the table's recommended codec, flat
    lines = _main_lines(capsys, *args, "--compress", "int8")
    words, tokens = _answer(lines)
    recommended = next(line for line in lines if line.endswith("<- recommended")).split()
    assert words.startswith(f"answer: no node level (node_size=1: 16 workers, one per node), compress "
                            f"{recommended[0]}, tau {recommended[-3]} (")
    assert tokens[6:] == ["node_size=1", f"compress={recommended[0]}", f"tau={recommended[-3]}"]


def test_the_answer_with_overlap_runs_overlapped(capsys, tmp_path):
    from risgd_planner import recommend_hierarchical_tau

    lines = _main_lines(capsys, *EXAMPLE, "--model-bytes", str(RESNET50_BYTES), "--overlap", "--overlap-delay", "20",
                        "--compress", "int8", "--recipe", "recipes/imagenet_resnet50.yaml")
    words, tokens = _answer(lines)
    tau = recommend_hierarchical_tau(0.12, RESNET50_BYTES, 8, 1, 0.1, 50e-6, 0.1, overlap=True, overlap_delay=20,
                                     compress="int2")  # the smallest measured payload (int2, measured 2026-12-07)
    assert words.startswith(f"answer: no node level (node_size=1: 8 workers, one per node), the rounds overlapped "
                            f"(delay {min(20, tau)} steps), compress int2, tau {tau} (")
    assert tokens[6:] == ["node_size=1", "compress=int2", f"tau={tau}", "overlap=true", f"overlap_delay={min(20, tau)}"]
    run = _resolves(tokens, 8, tmp_path)
    assert run.risgd.overlap and run.risgd.overlap_delay == min(20, tau) and run.risgd.tau == tau


def test_a_flat_round_carries_every_rank_of_a_node_over_its_link():
    from risgd_planner import flat_round_seconds, hierarchical_round_parts, payload_bytes, round_seconds

    s, bw, lat = 1e8, 1e9, 1e-4
    for c in ("none", "bf16", "int8", "int4"):  # one rank per node: the rounds among the nodes
        assert flat_round_seconds(s, 8, 1, bw, lat, c) == round_seconds(s, 8, bw, lat, c)
    assert flat_round_seconds(s, 4, 8, bw, lat) == ring_allreduce_seconds(s, 32, bw, lat)  # fp32: one ring
    # compressed: each rank's all_to_all and all_gather reach the 24 ranks of the other nodes over its node's link
    p = payload_bytes(s, "int8")
    assert flat_round_seconds(s, 4, 8, bw, lat, "int8") == pytest.approx(2 * 31 * lat + 2 * 8 * 3 / 4 * p / bw)
    # the node level sends a node's payload across once per round
    assert hierarchical_round_parts(s, 4, 8, bw, lat, compress="int8").cross == round_seconds(s, 4, bw, lat, "int8")


def test_the_old_path_is_the_planner_and_its_command_runs():
    import risgd_ext.cost_model
    import risgd_planner

    assert risgd_ext.cost_model is risgd_planner and risgd_ext.cost_model.main is main
    proc = subprocess.run([sys.executable, "-m", "risgd_ext.cost_model", "--nodes", "2", "--model-bytes", "1000",
                           "--bandwidth-gbit", "1", "--compute-ms", "10"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _prediction(proc.stdout)[0].startswith("1000 bytes: ") and proc.stdout.splitlines()[-1].startswith("answer:")


# -- the end-of-run line of a run whose bandwidth was measured on one machine -------------------------------

def test_a_bandwidth_measured_on_loopback_is_said_so_and_advises_nothing(monkeypatch, tmp_path, capsys):
    from risgd_trainer.run_config import resolve_run
    from risgd_trainer.train import finished_lines, on_loopback

    for addr, loop in (("127.0.0.1", True), ("localhost", True), ("::1", True), ("10.0.0.2", False)):
        monkeypatch.setenv("MASTER_ADDR", addr)
        assert on_loopback() is loop, addr
    stats = {"steps": 100, "world_size": 2, "comm_rounds": 10, "compute_seconds": 1.0, "bytes_allreduced": 1e7,
             "comm_seconds": 0.5}
    assert advise(stats, 1.0, 50e-6, 0.1, 10, loopback=True).keys() == advise(stats, 1.0, 50e-6, 0.1, 10).keys()
    assert "measured_on_loopback" not in advise(stats, 1.0, 50e-6, 0.1, 10)  # a given bandwidth: the network's
    run = resolve_run(os.path.join(ROOT, "recipes", "digits.yaml"), [f"runs_dir={tmp_path}", "tau=10"], 2)
    summary = {"steps": 100, "comm_rounds": 10, "wall_seconds": 3.0, "final_test_acc": None}
    said = {}
    for loop in (True, False):
        advice = advise(stats, 0.0, 50e-6, 0.1, 10, loopback=loop)
        assert advice["bandwidth_source"] == "measured" and advice["measured_on_loopback"] is loop
        said[loop] = finished_lines(run, {**summary, "cost_model": advice}).splitlines()[-1]
    assert said[False].startswith("  cost model (summary.json key cost_model): at ") and "keeps it under" in said[False]
    line, measured = said[True], advise(stats, 0.0, 50e-6, 0.1, 10)["bandwidth_gbit"]
    assert line.startswith(f"  cost model (summary.json key cost_model): at {measured:.3g} Gbit/s measured on "
                           "loopback (every rank on this machine), not a network: no advice on tau; for a network of "
                           "B Gbit/s set network.bandwidth_gbit=B, or ask ")
    assert "keeps it under" not in line and "recommended" not in line
    # what it says to ask runs: the planner on this run's measured bytes and compute, at a network's bandwidth
    ask = shlex.split(line.split(", or ask ", 1)[1].replace(" B", " 1"))
    assert ask[:3] == ["python", "-m", "risgd_planner"], ask
    lines = _main_lines(capsys, *ask[3:])
    assert lines[0] == ("1000000 bytes: 1.0 MiB per all-reduce; 2 nodes of 1 rank at 1 Gbit/s, 50 us latency, 10 ms "
                        "compute per step") and lines[-1].startswith("answer: ")


def test_a_codec_variant_is_taken_and_priced_beside_the_registered_codecs(capsys):
    """--compress topk0.01 (a variant: the registry resolves it, it is not among the listed names) was refused
    by argparse's choices; it is priced beside every registered codec and marked as the one asked for."""
    main([*FLAT, "--compress", "topk0.01"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if " payload " in line}
    assert {"none", "int4", "int2", "topk", "topk0.01"} <= set(rows) and rows["topk0.01"].rstrip().endswith(
        "<- --compress  (accuracy not measured on flat rounds: never recommended)")
    payload = {k: float(v.split("payload")[1].split("MiB")[0]) for k, v in rows.items()}
    assert payload["topk0.01"] < payload["topk"] < payload["int4"]  # 1% kept against the default 1/32
