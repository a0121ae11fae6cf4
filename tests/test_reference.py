"""The composition matrix: every case of a covering set of the axes (layout, codec, overlap, outer
step, warm-up, fault and its phase) runs the real engine on real gloo groups, and every worker's
model after every step must equal what ``risgd_ext.reference`` says the algorithm produces.

Bitwise where the engine sums in the reference's order (two contributions; the codecs' rank-order
sums); with four flat fp32 workers gloo's ring sums in its own order: within rtol 1e-5 there."""

from __future__ import annotations

import itertools

import pytest
import torch
from matrix_workers import batch, make_model, optimizer_params, run_cases

from risgd_ext import reference as ref
from risgd_hosts.local import run_ranks

pytestmark = pytest.mark.slow

AXES = {
    "layout": ["flat2", "node2x2", "flat4"],
    "compress": ["none", "int8", "int4"],
    "overlap": [False, True],
    "outer": [False, True],
    "warmup": [0, 2],
    "fault": ["none", "down", "nan_local", "nan_before_round", "nan_in_flight"],
}
LAYOUTS = {"flat2": (2, 1), "node2x2": (2, 2), "flat4": (4, 1)}  # workers, ranks per node
TAU = 3


def covering(axes: dict[str, list]) -> list[dict]:
    """A small set of cases in which every pair of values of two axes appears at least once (greedy:
    each new case covers the most pairs not yet covered; deterministic)."""
    names = list(axes)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in axes[a] for vb in axes[b]}
    cases = []
    while uncovered:
        best, best_gain = None, -1
        for values in itertools.product(*(axes[n] for n in names)):
            case = dict(zip(names, values))
            gain = sum((a, case[a], b, case[b]) in uncovered for a, b in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = case, gain
        cases.append(best)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return cases


def fault_of(case: dict) -> tuple[dict, list | None]:
    """The fault as the engine's failure schedule (worker 1 out of rounds 1-2) or a NaN written into
    worker 1's model between two steps: mid-round, just before a round's step, or just after a round
    started (under overlap: while it is in flight)."""
    w = case["warmup"]
    if case["fault"] == "down":
        return {"failures": [{"ranks": [1], "start_round": 1, "end_round": 3}]}, None
    at = {"nan_local": w + TAU + 1, "nan_before_round": w + 2 * TAU - 1, "nan_in_flight": w + TAU}.get(case["fault"])
    return {}, ([1, at] if at else None)


def engine_case(case: dict, i: int) -> dict:
    workers, k = LAYOUTS[case["layout"]]
    block = {"tau": TAU, "warmup_sync_steps": case["warmup"], "compress": case["compress"],
             "overlap": case["overlap"], "node_size": k, "bucket_mb": 1024 / 2 ** 20}  # 256 values: 3 buckets
    if case["outer"]:
        block.update(outer_lr=0.7, outer_momentum=0.5, outer_nesterov=True)
    failures, nan = fault_of(case)
    block.update(failures)
    return {"name": f"case{i}", "steps": case["warmup"] + 4 * TAU, "block": block, "nan": nan, "axes": case}


def _grad(w: int, local: int, step: int, x: torch.Tensor) -> torch.Tensor:
    m = make_model()
    torch.nn.utils.vector_to_parameters(x, m.parameters())
    xb, yb = batch(w, local, step)
    loss = torch.nn.functional.cross_entropy(m(xb), yb)
    return torch.nn.utils.parameters_to_vector(torch.autograd.grad(loss, list(m.parameters())))


def reference_of(case: dict) -> ref.Trace:
    block = case["block"]
    workers, k = LAYOUTS[case["axes"]["layout"]]
    fails = block.get("failures", [])

    def down(r: int) -> frozenset[int]:
        return frozenset(w for f in fails if f["start_round"] <= r < f["end_round"] for w in f["ranks"])

    setup = ref.Setup(workers=workers, node_size=k, tau=block["tau"], warmup=block["warmup_sync_steps"],
                      overlap=block["overlap"], outer_lr=block.get("outer_lr", 1.0),
                      outer_momentum=block.get("outer_momentum", 0.0),
                      outer_nesterov=block.get("outer_nesterov", False), compress=block["compress"],
                      bucket_values=int(block["bucket_mb"] * 2 ** 20) // 4, down=down)
    nan = case["nan"]

    def corrupt(w: int, step: int, x: torch.Tensor) -> None:
        if nan == [w, step]:
            x[3] = float("nan")

    x0 = torch.nn.utils.parameters_to_vector(make_model().parameters()).detach()
    return ref.run(setup, x0, _grad, lambda p: torch.optim.SGD([p], **optimizer_params()), case["steps"], corrupt)


CASES = [engine_case(c, i) for i, c in enumerate(covering(AXES))]


@pytest.fixture(scope="module")
def engine_runs() -> dict:
    torch.set_num_threads(1)
    out = {}
    for world in (2, 4):
        cases = [c for c in CASES if LAYOUTS[c["axes"]["layout"]][0] * LAYOUTS[c["axes"]["layout"]][1] == world]
        ranks = run_ranks(run_cases, world, cases, timeout=600)
        for c in cases:
            k = LAYOUTS[c["axes"]["layout"]][1]
            nodes = range(world // k)  # each worker's first and last rank
            out[c["name"]] = [ranks[w * k] for w in nodes], [ranks[w * k + k - 1] for w in nodes]
    return out


def test_covering_set_covers_every_pair():
    names = list(AXES)
    seen = {(a, c[a], b, c[b]) for c in covering(AXES) for a, b in itertools.combinations(names, 2)}
    assert all((a, va, b, vb) in seen for a, b in itertools.combinations(names, 2)
               for va in AXES[a] for vb in AXES[b])
    assert len(CASES) < 30


def mismatch(case: dict, first: list, last: list, expected: ref.Trace) -> str | None:
    """Where the engine's models differ from the reference's (None: nowhere)."""
    layout = case["axes"]["layout"]
    # gloo sums more than two fp32 contributions in its own order: a warm-up's gradients over 4 ranks, a
    # flat fp32 round of 4 workers; the codecs' sums are in rank order, as the reference's
    exact = layout == "flat2" or (case["axes"]["warmup"] == 0 and (layout == "node2x2" or
                                                                   case["block"]["compress"] != "none"))
    for step in range(1, case["steps"] + 1):
        for w, (a, b) in enumerate(zip(first, last)):
            if isinstance(a[case["name"]], str):
                return f"worker {w} raised {a[case['name']]}"
            got, other = a[case["name"]][step - 1], b[case["name"]][step - 1]
            want = expected.models[step][w]
            if not torch.equal(got, other) and not (torch.isnan(got).any() and torch.isnan(other).any()):
                return f"step {step}: worker {w}'s ranks differ"
            if not torch.equal(torch.isnan(got), torch.isnan(want)):
                return f"step {step}: worker {w} has NaN where the reference has none, or the other way round"
            got, want = got.nan_to_num(0), want.nan_to_num(0)
            if not (torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-5, atol=1e-7)):
                return f"step {step}: worker {w} differs by {(got - want).abs().max().item():.3g}"
    return None


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c["axes"].values()))
def test_case_equals_reference(case, engine_runs):
    first, last = engine_runs[case["name"]]
    where = mismatch(case, first, last, reference_of(case))
    if where is not None:
        pytest.fail(f"{case['axes']}: {where}")


def test_mismatch_is_found():
    """The comparison can fail: the reference's own models match, one value of one step changed does not."""
    case = CASES[0]
    expected = reference_of(case)
    workers = [{case["name"]: [expected.models[s][w].clone() for s in range(1, case["steps"] + 1)]} for w in range(2)]
    assert mismatch(case, workers, workers, expected) is None
    workers[1][case["name"]][4][0] += 1e-6
    assert mismatch(case, workers, workers, expected) == "step 5: worker 1 differs by 1e-06"
