"""The composition matrix: cases of the axes (layout, codec, overlap, outer step, warm-up, fault and its
phase) run by the real engine on real gloo groups, each compared step by step with what
``risgd_ext.reference`` says the algorithm produces.

    from risgd_hosts.matrix import AXES, covering, cases_of, run_engine, check
    cases = cases_of(covering(AXES))          # every pair of axis values at least once
    verdicts = check(cases, run_engine(cases))  # case name -> None (held) or where it differs

``tests/test_reference.py`` runs the covering set; ``benchmarks/bench_matrix.py`` the whole product.

Each case trains a small tanh MLP (603 parameters, 256-value buckets: 3 per round) for four rounds
after its warm-up with SGD and momentum, on per-(worker, rank, step) batches. Faults: worker 1 out of
rounds 1-2 (the failure schedule), or a NaN written into worker 1's model (every rank of it) between
two steps: mid-round, just before a round's step, or just after a round started (under overlap, while
it is in flight). Bitwise where the engine sums in the reference's order (two contributions, the
codecs' rank-order sums, a warm-up's equal gradients); gloo's ring sums four fp32 contributions in an
order of its own (a flat fp32 round of four workers): within rtol 1e-5 there.
"""

from __future__ import annotations

import itertools

import torch

AXES: dict[str, list] = {
    "layout": ["flat2", "node2x2", "flat4"],
    "compress": ["none", "int8", "int4", "int2", "topk"],
    "overlap": [False, True],
    "outer": [False, True],
    "warmup": [0, 2],
    "fault": ["none", "down", "nan_local", "nan_before_round", "nan_in_flight", "late"],
}


def valid(case: dict) -> bool:
    """Whether a combination of axis values can run: a deadline (fault "late") needs one rank per worker, and is
    refused with overlap and a codec (the whole product found those cases hang: docs/stragglers.md)."""
    if case.get("fault") != "late":
        return True
    if LAYOUTS[case.get("layout", "flat2")][1] > 1:
        return False
    return not (case.get("overlap") and case.get("compress", "none") != "none")

LAYOUTS = {"flat2": (2, 1), "node2x2": (2, 2), "flat4": (4, 1)}  # workers, ranks per worker
TAU = 3
FEATURES, HIDDEN, CLASSES, BATCH = 10, 40, 3, 6


def covering(axes: dict[str, list]) -> list[dict]:
    """A small set of valid cases in which every pair of values of two axes that can run together appears at
    least once (greedy: each new case covers the most pairs not yet covered; deterministic)."""
    names = list(axes)
    pairs = list(itertools.combinations(names, 2))
    uncovered = {(a, va, b, vb) for a, b in pairs for va in axes[a] for vb in axes[b] if valid({a: va, b: vb})}
    cases = []
    while uncovered:
        best, best_gain = None, -1
        for values in itertools.product(*(axes[n] for n in names)):
            case = dict(zip(names, values))
            if not valid(case):
                continue
            gain = sum((a, case[a], b, case[b]) in uncovered for a, b in pairs)
            if gain > best_gain:
                best, best_gain = case, gain
        cases.append(best)
        uncovered -= {(a, best[a], b, best[b]) for a, b in pairs}
    return cases


def product(axes: dict[str, list]) -> list[dict]:
    """Every valid combination of the axes' values."""
    return [case for values in itertools.product(*axes.values()) if valid(case := dict(zip(axes, values)))]


# -- one case ---------------------------------------------------------------------------------------
def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES))


def batch(worker: int, local: int, step: int, warmup: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (worker, local)'s batch at step ``step``: a function of the three alone; during the warm-up every
    rank's is the same (the gradients then sum to the same bits in any order of a sequential sum: gloo's
    four-rank all-reduce is matched bitwise, where a codec would turn its last bits into a quantum)."""
    if step <= warmup:
        worker = local = 0
    g = torch.Generator().manual_seed(10007 * step + 101 * worker + local + 1)
    return torch.randn(BATCH, FEATURES, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


OPTIMIZER = {"lr": 0.1, "momentum": 0.9}


LATE = (1, 1)  # fault "late": worker 1 is late at round 2's deadline after 1 of its TAU steps


def _fault(axes: dict) -> tuple[dict, list | None]:
    w = axes["warmup"]
    if axes["fault"] == "down":
        return {"failures": [{"ranks": [1], "start_round": 1, "end_round": 3}]}, None
    if axes["fault"] == "late":
        return {"deadline_margin": 0.5}, None
    at = {"nan_local": w + TAU + 1, "nan_before_round": w + 2 * TAU - 1, "nan_in_flight": w + TAU}.get(axes["fault"])
    return {}, ([1, at] if at else None)


def cases_of(axes_list: list[dict]) -> list[dict]:
    """The engine's cases (a ``risgd`` block, steps, the NaN to inject) of axis values."""
    out = []
    for i, axes in enumerate(axes_list):
        workers, k = LAYOUTS[axes["layout"]]
        block = {"tau": TAU, "warmup_sync_steps": axes["warmup"], "compress": axes["compress"],
                 "overlap": axes["overlap"], "node_size": k, "bucket_mb": 1024 / 2 ** 20}  # 256 values a bucket
        if axes["outer"]:
            block.update(outer_lr=0.7, outer_momentum=0.5, outer_nesterov=True)
        failures, nan = _fault(axes)
        block.update(failures)
        out.append({"name": f"case{i}", "steps": axes["warmup"] + 4 * TAU, "block": block, "nan": nan, "axes": axes})
    return out


def run_case(rank: int, case: dict) -> list[torch.Tensor]:
    """One case on this rank of a gloo group: its flat parameters after every step."""
    import risgd_ext

    model = make_model()
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": OPTIMIZER}, "gradient_clipping": 0.0,
              "steps_per_print": 10 ** 9, "risgd": case["block"]}
    engine, *_ = risgd_ext.initialize(model=model, model_parameters=model.parameters(), config=config)
    k = case["block"].get("node_size", 1)
    worker, local = rank // k, rank % k
    flat = engine.risgd.model.flats[0]
    ctl = engine.risgd
    if ctl.deadline is not None:  # a scripted clock: a second a step, and worker LATE[0] slow from its step late_at on
        late_at = case["block"]["warmup_sync_steps"] + 2 * TAU + LATE[1]
        ctl.deadline.clock = lambda: ctl.steps + (1000.0 if worker == LATE[0] and ctl.steps >= late_at else 0.0)
    out = []
    for step in range(1, case["steps"] + 1):
        if ctl.skipping:  # late at the deadline: the rest of the round's steps are skipped
            engine.skip_step()
            out.append(flat.params.detach().clone())
            continue
        x, y = batch(worker, local, step, case["block"]["warmup_sync_steps"])
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        if case["nan"] == [worker, step]:
            with torch.no_grad():
                flat.params[3] = float("nan")  # a fault between this step and the next
        out.append(flat.params.detach().clone())
    engine.risgd.consensus()
    return out


def run_cases(rank: int, world_size: int, cases: list[dict]) -> dict:
    """Every case on this rank, one after another in one process group; a case that raises is reported."""
    import torch.distributed as dist

    import risgd_ext

    risgd_ext.init_distributed()
    results = {}
    for case in cases:
        try:
            results[case["name"]] = run_case(rank, case)
        except Exception as e:  # reported per case; the group goes on with the next
            results[case["name"]] = f"{type(e).__name__}: {e}"
        dist.barrier()
    return results


def run_engine(cases: list[dict], timeout: float = 1800) -> dict:
    """The engine's models: case name -> (each worker's first rank's list, each worker's last rank's)."""
    from risgd_hosts.local import run_ranks

    out = {}
    for world in (2, 4):
        mine = [c for c in cases if LAYOUTS[c["axes"]["layout"]][0] * LAYOUTS[c["axes"]["layout"]][1] == world]
        if not mine:
            continue
        ranks = run_ranks(run_cases, world, mine, timeout=timeout)
        for c in mine:
            k = LAYOUTS[c["axes"]["layout"]][1]
            nodes = range(world // k)
            out[c["name"]] = ([ranks[w * k][c["name"]] for w in nodes],
                              [ranks[w * k + k - 1][c["name"]] for w in nodes])
    return out


# -- the reference's answer and the comparison -------------------------------------------------------
def _grad(w: int, local: int, step: int, x: torch.Tensor, warmup: int) -> torch.Tensor:
    m = make_model()
    torch.nn.utils.vector_to_parameters(x, m.parameters())
    xb, yb = batch(w, local, step, warmup)
    loss = torch.nn.functional.cross_entropy(m(xb), yb)
    return torch.nn.utils.parameters_to_vector(torch.autograd.grad(loss, list(m.parameters())))


def reference_of(case: dict):
    """What the algorithm produces for ``case`` (``risgd_ext.reference.run``)."""
    from risgd_ext import reference as ref

    block = case["block"]
    workers, k = LAYOUTS[case["axes"]["layout"]]
    fails = block.get("failures", [])

    def down(r: int) -> frozenset[int]:
        return frozenset(w for f in fails if f["start_round"] <= r < f["end_round"] for w in f["ranks"])

    setup = ref.Setup(workers=workers, node_size=k, tau=block["tau"], warmup=block["warmup_sync_steps"],
                      overlap=block["overlap"], outer_lr=block.get("outer_lr", 1.0),
                      outer_momentum=block.get("outer_momentum", 0.0),
                      outer_nesterov=block.get("outer_nesterov", False), compress=block["compress"],
                      bucket_values=int(block["bucket_mb"] * 2 ** 20) // 4, down=down,
                      late=lambda r: {LATE[0]: LATE[1]} if block.get("deadline_margin") and r == 2 else {})

    def corrupt(w: int, step: int, x: torch.Tensor) -> None:
        if case["nan"] == [w, step]:
            x[3] = float("nan")

    x0 = torch.nn.utils.parameters_to_vector(make_model().parameters()).detach()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank computes (risgd_hosts.local): a matmul's sums depend on the threads
    try:
        return ref.run(setup, x0, lambda w, k, s, x: _grad(w, k, s, x, setup.warmup),
                       lambda p: torch.optim.SGD([p], **OPTIMIZER), case["steps"], corrupt)
    finally:
        torch.set_num_threads(threads)


def exact(case: dict) -> bool:
    """Whether the engine sums in the reference's order throughout (the comparison is then bitwise): all but
    the flat fp32 rounds of four workers, which gloo's ring sums in its own order."""
    return case["axes"]["layout"] != "flat4" or case["block"]["compress"] != "none"


def mismatch(case: dict, first: list, last: list, expected) -> str | None:
    """Where the engine's models (``first``/``last``: each worker's first and last rank's per-step list, or
    the exception a rank raised) differ from the reference's ``expected`` (None: nowhere)."""
    bitwise = exact(case)
    for step in range(1, case["steps"] + 1):
        for w, (a, b) in enumerate(zip(first, last)):
            if isinstance(a, str):
                return f"worker {w} raised {a}"
            got, other = a[step - 1], b[step - 1]
            want = expected.models[step][w]
            if not torch.equal(got.nan_to_num(0), other.nan_to_num(0)):
                return f"step {step}: worker {w}'s ranks differ"
            if not torch.equal(torch.isnan(got), torch.isnan(want)):
                return f"step {step}: worker {w} has NaN where the reference has none, or the other way round"
            got, want = got.nan_to_num(0), want.nan_to_num(0)
            if not (torch.equal(got, want) if bitwise else torch.allclose(got, want, rtol=1e-5, atol=1e-7)):
                return f"step {step}: worker {w} differs by {(got - want).abs().max().item():.3g}"
    return None


def check(cases: list[dict], engine: dict) -> dict[str, str | None]:
    """Case name -> None (every step of every worker as the reference says) or where it differs."""
    return {c["name"]: mismatch(c, *engine[c["name"]], reference_of(c)) for c in cases}
