"""The composition matrix's ranks: each case trains a small model with the real engine on a real gloo
group and returns every step's flat parameters, for the test process to compare with
``risgd_ext.reference`` (tests/test_reference.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import risgd_ext

FEATURES, CLASSES, BATCH = 10, 3, 6


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 40), torch.nn.Tanh(), torch.nn.Linear(40, CLASSES))


def batch(worker: int, local: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (worker, local)'s batch at step ``step``: a function of the three alone."""
    g = torch.Generator().manual_seed(10007 * step + 101 * worker + local + 1)
    return torch.randn(BATCH, FEATURES, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def optimizer_params() -> dict:
    return {"lr": 0.1, "momentum": 0.9}


def ds_config(block: dict) -> dict:
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "SGD", "params": optimizer_params()},
            "gradient_clipping": 0.0, "steps_per_print": 10 ** 9, "risgd": block}


def run_case(rank: int, case: dict) -> list[torch.Tensor]:
    """One case on this rank: its flat parameters after every step."""
    model = make_model()
    engine, *_ = risgd_ext.initialize(model=model, model_parameters=model.parameters(), config=ds_config(case["block"]))
    k = case["block"].get("node_size", 1)
    worker, local = rank // k, rank % k
    flat = engine.risgd.model.flats[0]
    out = []
    for step in range(1, case["steps"] + 1):
        x, y = batch(worker, local, step)
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        if case.get("nan") and case["nan"] == [worker, step]:
            with torch.no_grad():
                flat.params[3] = float("nan")  # a fault between this step and the next
        out.append(flat.params.detach().clone())
    engine.risgd.consensus()
    return out


def run_cases(rank: int, world_size: int, cases: list[dict]) -> dict:
    risgd_ext.init_distributed()
    results = {}
    for case in cases:
        try:
            results[case["name"]] = run_case(rank, case)
        except Exception as e:  # reported per case; the group goes on with the next
            results[case["name"]] = f"{type(e).__name__}: {e}"
        dist.barrier()
    return results
