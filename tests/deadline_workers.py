"""Scenarios of the round's deadline, run inside each rank of a real gloo group (risgd_hosts.local.run_ranks)."""

from __future__ import annotations

import time

import torch

WORKERS = 3
SLOW = 2          # the slow worker
TAU, ROUNDS = 4, 8
BASE_S = 0.05     # every rank's step takes at least this (a round of milliseconds would be all OS jitter)


def _engine(margin: float):
    import risgd_ext

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}, "steps_per_print": 10 ** 9,
              "risgd": {"tau": TAU, "deadline_margin": margin}}
    engine, *_ = risgd_ext.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def slow_worker(rank: int, world_size: int, margin: float, refuse: bool, slow_s: float) -> dict:
    """Every rank's step takes BASE_S more, rank SLOW's ``slow_s`` more still (a node at a fraction of the others'
    pace); ``refuse``: the trainer's check says the on-time workers never cover the data. Returns this rank's
    accounting, the seconds its rounds' local steps and waits took, and its final model (after consensus)."""
    import risgd_ext

    risgd_ext.init_distributed()
    engine = _engine(margin)
    ctl = engine.risgd
    if refuse:
        ctl.deadline.accept = lambda on_time: f"{sorted(on_time)} do not cover the data"
    g = torch.Generator().manual_seed(rank)
    skipped_at, t0 = [], time.perf_counter()
    for step in range(1, TAU * ROUNDS + 1):
        if ctl.skipping:
            skipped_at.append(step)
            engine.skip_step()
            continue
        x, y = torch.randn(4, 8, generator=g), torch.randint(0, 2, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        time.sleep(BASE_S + (slow_s if rank == SLOW else 0.0))
        engine.step()
    wall = time.perf_counter() - t0
    stats = ctl.consensus()
    flat = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    return {"stats": {k: stats[k] for k in ("late_rounds", "late_rounds_here", "late_waited", "steps_skipped",
                                            "rounds", "steps", "deadline_s")},
            "events": ctl.take_late_events(), "skipped_at": skipped_at, "wall": wall, "model": flat}
