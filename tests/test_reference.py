"""The composition matrix (risgd_hosts.matrix): every case of a covering set of the axes (layout, codec,
overlap, outer step, warm-up, fault and its phase) runs the real engine on real gloo groups, and every
worker's model after every step must equal what ``risgd_ext.reference`` says the algorithm produces."""

from __future__ import annotations

import itertools

import pytest

from risgd_hosts.matrix import AXES, cases_of, covering, mismatch, reference_of, run_engine, valid

pytestmark = pytest.mark.slow

CASES = cases_of(covering(AXES))


@pytest.fixture(scope="module")
def engine_runs() -> dict:
    return run_engine(CASES, timeout=600)


def test_covering_set_covers_every_pair():
    names = list(AXES)
    seen = {(a, c["axes"][a], b, c["axes"][b]) for c in CASES for a, b in itertools.combinations(names, 2)}
    assert all((a, va, b, vb) in seen for a, b in itertools.combinations(names, 2)
               for va in AXES[a] for vb in AXES[b] if valid({a: va, b: vb}))
    assert all(valid(c["axes"]) for c in CASES)
    assert not valid({"layout": "node2x2", "fault": "late"})  # a deadline needs one rank per worker
    assert len(CASES) < 36


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c["axes"].values()))
def test_case_equals_reference(case, engine_runs):
    where = mismatch(case, *engine_runs[case["name"]], reference_of(case))
    if where is not None:
        pytest.fail(f"{case['axes']}: {where}")


def test_mismatch_is_found():
    """The comparison can fail: the reference's own models match, one value of one step changed does not."""
    case = CASES[0]
    expected = reference_of(case)
    workers = [[expected.models[s][w].clone() for s in range(1, case["steps"] + 1)] for w in range(2)]
    assert mismatch(case, workers, workers, expected) is None
    workers[1][4][0] += 1e-6
    assert mismatch(case, workers, workers, expected) == "step 5: worker 1 differs by 1e-06"
    assert mismatch(case, ["RuntimeError: x", workers[1]], workers, expected) == "worker 0 raised RuntimeError: x"
    nan = [[m.clone() for m in workers[0]], workers[1]]
    nan[0][2][1] = float("nan")
    assert "NaN where the reference has none" in mismatch(case, nan, nan, expected)


def test_a_late_worker_is_not_a_worker_on_time(engine_runs):
    """The late axis is checked: the engine's late case differs from the reference of the same case with nobody
    late (worker 1 skipped the last 2 steps of round 2 and took the average), from the step it skipped on."""
    case = next(c for c in CASES if c["axes"]["fault"] == "late" and c["axes"]["layout"] == "flat2")
    engine = engine_runs[case["name"]]
    assert mismatch(case, *engine, reference_of(case)) is None
    on_time = dict(case, block={k: v for k, v in case["block"].items() if k != "deadline_margin"})
    where = mismatch(case, *engine, reference_of(on_time))
    first_skipped = case["block"]["warmup_sync_steps"] + 2 * 3 + 2
    assert where is not None and where.startswith(f"step {first_skipped}: worker 1 differs"), where
