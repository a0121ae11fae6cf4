"""risgd_ext on real DeepSpeed engines in a real 3-rank gloo group.

All scenarios run in one spawn of 3 processes (module fixture) to keep the suite fast; each test
below checks one behaviour on the returned data.
"""

from __future__ import annotations

import math

import pytest
import torch

from risgd_ext.flat import SLOT
from risgd_hosts.local import run_ranks
from tests.engine_workers import run_all

WORLD = 3


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(run_all, WORLD, str(tmp_path_factory.mktemp("ckpt")))


def flat(tensors) -> torch.Tensor:
    if isinstance(tensors, dict):
        tensors = [v for v in tensors.values() if v.is_floating_point()]
    return torch.cat([t.flatten().double() for t in tensors])


def identical(states: list[dict]) -> bool:
    return all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])


@pytest.mark.parametrize("data", ["same", "different"])
def test_tau1_local_sgd_equals_synchronous_deepspeed(results, data):
    for r in results:
        local, plain = r["sync_equivalence"][data]
        for a, b in zip(local, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ranks_identical_after_each_round_and_differ_between(results):
    tau = 4
    for name in ("risgd", "risgd_small_buckets", "risgd_autocast_bf16"):
        per_rank = [r["rounds"][name]["states"] for r in results]
        for step in range(len(per_rank[0])):
            states = [p[step] for p in per_rank]
            if (step + 1) % tau == 0:
                assert identical(states), f"{name}: ranks differ right after round at step {step + 1}"
            else:
                assert not torch.equal(flat(states[0]), flat(states[1])), f"{name}: no local progress at {step + 1}"


def test_no_collective_between_rounds(results):
    tau = 4
    round_bytes = results[0]["rounds"]["risgd"]["stats"][tau - 1]["bytes_allreduced"]
    small = math.ceil(round_bytes / int(0.0005 * 2**20))  # bucket_mb=0.0005 in engine_workers
    assert small > 1
    for name, buckets in (("risgd", 1), ("risgd_small_buckets", small), ("risgd_autocast_bf16", 1)):
        for r in results:
            for step, counts in enumerate(r["rounds"][name]["counts"]):
                if (step + 1) % tau:
                    assert counts == {}, f"{name}: collectives {counts} on local step {step + 1}"
                else:
                    # one all_reduce per bucket and nothing else
                    assert counts == {"all_reduce": buckets}, f"{name}: {counts} at round step {step + 1}"


def test_collective_counter_sees_plain_deepspeed_traffic(results):
    # Control for the test above: plain DeepSpeed all-reduces gradients (and the clip norm) every step.
    for r in results:
        assert all(c.get("all_reduce", 0) >= 1 for c in r["rounds"]["plain"]["counts"])


def test_accounting(results):
    stats = results[0]["rounds"]["risgd"]["stats"][-1]
    params = sum(p.numel() for k, p in results[0]["rounds"]["risgd"]["states"][-1].items() if "running" not in k
                 and p.is_floating_point())
    assert stats["rounds"] == 2 and stats["local_steps"] == 8 and stats["sync_steps"] == 0
    assert stats["comm_rounds"] == 2 and stats["steps_in_round"] == 0
    # parameters + BatchNorm running stats + the slot (||d||² and the count), fp32, per round
    buffers = 2 * 24
    assert stats["bytes_allreduced"] == 2 * 4 * (params + buffers + SLOT)
    assert stats["comm_seconds"] > 0 and stats["compute_seconds"] > 0
    assert stats["average_seconds"] >= stats["comm_seconds"]
    assert stats["divergence"] > 0


def test_gradient_accumulation_counts_optimizer_steps(results):
    gas = results[0]["gas"]
    # tau=3 optimizer steps x 2 micro-batches: a round (one all_reduce) every 6 micro-batches
    assert gas["counts"] == [0, 0, 0, 0, 0, 1] * 2
    assert gas["rounds"] == [0] * 5 + [1] * 6 + [2]
    assert gas["stats"]["steps"] == 6


def test_warmup_is_synchronous_then_local(results):
    warm = [r["warmup"] for r in results]
    counts = [sum(c.values()) for c in warm[0]["counts"]]
    # 3 synchronous steps (gradient all-reduce, clipping by local norm adds nothing), then tau=2 rounds
    assert counts[:3] == [1, 1, 1] and counts[3:] == [0, 1, 0, 1]
    for step in range(3):
        params = [{k: v for k, v in w["states"][step].items() if "running" not in k} for w in warm]
        assert identical(params), "ranks must agree during synchronous warm-up"
    assert warm[0]["stats"]["sync_steps"] == 3 and warm[0]["stats"]["rounds"] == 2


def test_the_engine_says_where_the_model_is_an_average(results):
    warm = [r["warmup"] for r in results]
    # steps 1..3 synchronous, then rounds close at steps 5 and 7 (tau=2)
    assert warm[0]["averaged"] == [True, True, True, False, True, False, True]
    assert [c == "ok" for c in warm[0]["consensus"]] == warm[0]["averaged"]
    assert "inside a round" in warm[0]["consensus"][3]
    for step, averaged in enumerate(warm[0]["averaged"]):
        if averaged:  # after consensus() every rank holds the same model, BatchNorm statistics included
            assert identical([w["agreed"][step] for w in warm])


def test_momentum_averaging_on_and_off(results):
    on = [r["momentum"][True] for r in results]
    off = [r["momentum"][False] for r in results]
    assert all(torch.equal(flat(on[0]), flat(m)) for m in on[1:])
    assert not torch.equal(flat(off[0]), flat(off[1]))


def test_failed_rank_has_weight_zero_and_rejoins(results):
    fails = [r["failures"] for r in results]
    assert fails[0]["live"] == [3, 2, 3]
    for rnd, live in enumerate(([0, 1, 2], [0, 2], [0, 1, 2])):
        before = [flat(f["before"][rnd]) for f in fails]
        expected = sum(before[j] for j in live) / len(live)
        for f in fails:  # every rank, the failed one too, takes the live average
            torch.testing.assert_close(flat(f["after"][rnd]), expected, rtol=1e-6, atol=1e-6)
        divergence = sum(((before[j] - expected) ** 2).sum() for j in live) / len(live) / (expected ** 2).sum()
        assert fails[0]["divergence"][rnd] == pytest.approx(float(divergence), rel=1e-3)
    assert [f["stats"]["rounds_down"] for f in fails] == [0, 1, 0]


def test_resume_mid_round_is_bitwise(results):
    for r in results:
        res = r["resume"]
        assert res["start"] == 6
        assert res["path"].endswith("mp_rank_00_model_states.pt")
        for k, v in res["straight"].items():
            assert torch.equal(v, res["resumed"][k]), f"{k} differs after resume"
        for key in ("steps", "rounds", "local_steps", "bytes_allreduced", "divergence"):
            assert res["stats_straight"][key] == res["stats_resumed"][key]
        assert res["client_state_rounds"] == 1
        assert res["latest"] == "mid"  # written atomically after every rank finished the tag
        assert not [f for f in res["files"] if ".tmp." in f]
        assert {f"risgd_rank{r:05d}.pt" for r in range(WORLD)} <= set(res["files"])


def test_plain_deepspeed_buffers_can_be_averaged(results):
    before = [r["plain_buffers"]["before"] for r in results]
    after = [r["plain_buffers"]["after"] for r in results]
    assert not identical(before)  # plain DeepSpeed never syncs BatchNorm statistics
    assert identical(after)
    for key in before[0]:
        torch.testing.assert_close(after[0][key], sum(b[key] for b in before) / WORLD)


def test_checkpoints_load_weights_only(results):
    for r in results:
        assert r["malicious"]["refused"], "a checkpoint that runs code on load must be refused"
        assert not r["malicious"]["marker_exists"]


def test_local_steps_take_the_lean_path(results):
    for r in results:
        assert all(r["rounds"][name]["lean"] for name in ("risgd", "risgd_small_buckets", "risgd_autocast_bf16"))
        lean, ds = r["lean"]["lean"], r["lean"]["deepspeed"]
        assert lean["lean"] and not ds["lean"]
        # DeepSpeed's throughput timer synchronises the device twice per step: off unless configured
        assert not lean["tput_timer"] and ds["tput_timer"]


def test_lean_local_steps_equal_deepspeeds_path(results):
    # warm-up 2 synchronous steps, then tau=3 rounds; 2 micro-batches per step; momentum, clipping and
    # an LR schedule: the lean path and DeepSpeed's own end every micro-batch bit for bit equal
    for r in results:
        lean, ds = r["lean"]["lean"], r["lean"]["deepspeed"]
        for step, (a, b) in enumerate(zip(lean["states"], ds["states"])):
            for k in a:
                assert torch.equal(a[k], b[k]), f"{k} differs after micro-batch {step + 1}"
        assert lean["counters"] == ds["counters"]  # global_steps, samples, micro_steps, skipped, lr, steps
        assert lean["counters"][-1][0] == lean["counters"][-1][5] == 8
        assert lean["compute_seconds"] > 0


def test_cpu_lean_step_releases_gradients_at_the_next_backward(results):
    lean, ds = results[0]["lean"]["lean"], results[0]["lean"]["deepspeed"]
    gas = 2
    for micro, held in enumerate(lean["grads_after_step"]):
        step = micro // gas + 1
        boundary = (micro + 1) % gas == 0
        # mid-accumulation gradients are kept; after an optimizer step DeepSpeed frees them, the
        # lean CPU path keeps them until the next backward (synchronous steps: DeepSpeed's order)
        assert held == (not boundary or step > 2), f"micro-batch {micro + 1}"
    assert ds["grads_after_step"] == [(micro + 1) % gas != 0 for micro in range(len(ds["grads_after_step"]))]


def test_channels_last_models_keep_their_layout(results):
    for r in results:
        for name in ("risgd", "plain"):
            assert all(r["channels_last"][name]["layouts"]), f"{name}: the conv weight lost channels_last"
    for step in (1, 3):  # tau=2: rounds close at steps 2 and 4
        assert identical([r["channels_last"]["risgd"]["states"][step] for r in results])
    for step in range(4):  # plain DeepSpeed: synchronous, parameters agree after every step
        assert identical([{k: v for k, v in r["channels_last"]["plain"]["states"][step].items() if "running" not in k
                           and "num_batches" not in k} for r in results])
    assert not torch.equal(flat(results[0]["channels_last"]["risgd"]["states"][0]),
                           flat(results[1]["channels_last"]["risgd"]["states"][0]))


# -- the per-rank checkpoint file and the compute clock, without a process group ------------------

class _FakeAccelerator:
    """An accelerator with two devices and an RNG state per device."""

    def __init__(self):
        self.states = {0: torch.tensor([1, 2, 3], dtype=torch.uint8), 1: torch.tensor([4, 5, 6], dtype=torch.uint8)}

    def device_name(self, *args):
        return "cuda"

    def is_available(self):
        return True

    def device_count(self):
        return 2

    def get_rng_state(self, i):
        return self.states[i].clone()

    def set_rng_state(self, state, i):
        self.states[i] = state.clone()


def _fake_engine(block: dict | None):
    from types import SimpleNamespace

    from risgd_ext import RISGDController, parse_block

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    engine = SimpleNamespace(module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9),
                             enable_backward_allreduce=True)
    engine.risgd = RISGDController(engine, parse_block(block) if block is not None else None)
    return engine


@pytest.mark.parametrize("block", [None, {"tau": 2}])
def test_rank_state_holds_device_rng_only_with_an_accelerator(tmp_path, monkeypatch, block):
    import risgd_ext.engine as eng

    engine = _fake_engine(block)
    eng.save_rank_state(engine, str(tmp_path / "cpu"))
    state = torch.load(tmp_path / "cpu" / "risgd_rank00000.pt", weights_only=True)
    assert "rng_cpu" in state and "rng_device" not in state  # this machine has no accelerator
    assert state["format"] == 2

    fake = _FakeAccelerator()
    monkeypatch.setattr(eng, "get_accelerator", lambda: fake)
    eng.save_rank_state(engine, str(tmp_path / "gpu"))
    state = torch.load(tmp_path / "gpu" / "risgd_rank00000.pt", weights_only=True)
    assert [s.tolist() for s in state["rng_device"]] == [[1, 2, 3], [4, 5, 6]]
    fake.states = {0: torch.zeros(3, dtype=torch.uint8), 1: torch.zeros(3, dtype=torch.uint8)}
    eng.load_rank_state(_fake_engine(block), str(tmp_path / "gpu"))
    assert [fake.states[i].tolist() for i in (0, 1)] == [[1, 2, 3], [4, 5, 6]]  # restored per device


def test_rank_state_without_device_rng_still_loads(tmp_path, monkeypatch):
    import risgd_ext.engine as eng

    engine = _fake_engine({"tau": 2})
    expected = torch.get_rng_state()
    eng.save_rank_state(engine, str(tmp_path))
    path = tmp_path / "risgd_rank00000.pt"
    state = torch.load(path, weights_only=True)
    state["format"] = 1  # as written before the device RNG was saved
    torch.save(state, path)
    fake = _FakeAccelerator()
    monkeypatch.setattr(eng, "get_accelerator", lambda: fake)  # loading where an accelerator is
    torch.manual_seed(123)
    resumed = _fake_engine({"tau": 2})
    eng.load_rank_state(resumed, str(tmp_path))
    assert torch.equal(torch.get_rng_state(), expected)
    assert [fake.states[i].tolist() for i in (0, 1)] == [[1, 2, 3], [4, 5, 6]]  # left as they were
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, resumed.module.state_dict()[k])


class _FakeEvent:
    """A timing event on a fake asynchronous device (one stream: an event is done once a later one is)."""

    now = 0.0

    def __init__(self, enable_timing=False):
        self.t, self.done = None, False

    def record(self):
        self.t, self.done = _FakeEvent.now, False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True

    def elapsed_time(self, end):
        assert end.done and self.t <= end.t, "elapsed_time needs both events complete"
        return (end.t - self.t) * 1e3


def test_compute_seconds_from_device_events_without_waiting():
    engine = _fake_engine(None)  # plain DeepSpeed: every step synchronous
    ctl = engine.risgd
    ctl._event_cls = _FakeEvent  # what an asynchronous accelerator (CUDA) gets
    for step in range(3):
        _FakeEvent.now = 10.0 * step
        ctl.mark_step_start()
        _FakeEvent.now += 2.0
        ctl.record_gradient_allreduce(100, 0.5)  # communication inside the step is not compute
        ctl.after_optimizer_step()
    assert ctl.compute_seconds == 0.0 and len(ctl._pending) == 3  # nothing waited for the device
    for _, end, _ in list(ctl._pending)[:2]:
        end.done = True
    ctl._collect_events(wait=False)  # reads what has finished, in order, without waiting
    assert ctl.compute_seconds == pytest.approx(2 * 1.5) and len(ctl._pending) == 1
    stats = ctl.stats()  # waits for the rest
    assert stats["compute_seconds"] == pytest.approx(3 * 1.5) and not ctl._pending
    assert len(ctl._free_events) == 6  # events are reused
    ctl.mark_step_start()
    assert len(ctl._free_events) == 5


def test_forgotten_consensus_warns_once_on_every_rank(results):
    """(Its own 2-rank spawn before; folded into this group's, issue 34.)"""
    for out in (r["forgotten_consensus"] for r in results):
        assert len(out["in_flight"]) == 1
        assert "the engine is destroyed while a round is in flight" in out["in_flight"][0]
        assert "consensus()" in out["in_flight"][0]
        assert len(out["mid_round"]) == 1 and "step 3 is inside a round" in out["mid_round"][0]
        assert out["again"] == [] and out["after_consensus"] == []
        # one warning per live engine whose ranks hold different models: the scenario's own (in flight at
        # step 2), and any that earlier scenarios of this group left mid-round
        assert all("the process group is destroyed" in m for m in out["process_group"])
        assert sum("a round is in flight at step 2 (overlap)" in m for m in out["process_group"]) == 1
