"""Scenarios of the elastic checkpoint (state keyed by manifest worker), run inside each rank of a
real gloo group (risgd_hosts.local.run_ranks) at changing world sizes."""

from __future__ import annotations

import torch

from tests.engine_workers import build, ds_config, momentum, state, train_step

TAU = 2


def _engine(rank: int, workers: list[int], ckpt_dir: str | None):
    engine = build(ds_config({"tau": TAU}, momentum=0.9))
    engine.risgd.identity = workers[rank]  # the manifest worker this rank serves (not its rank number)
    if ckpt_dir is not None:
        torch.manual_seed(999)  # another RNG position: a worker with state gets its own back
        engine.load_checkpoint(ckpt_dir)
    return engine


def _train(engine, worker: int, steps: int) -> None:
    start = engine.risgd.steps
    for s in range(start, start + steps):
        train_step(engine, worker, s)  # the data of the worker, not of the rank


def scenario_phase(rank: int, world_size: int, workers: list[int], ckpt_dir: str, load: bool | str, tag: str,
                   mid_tag: str | None = None) -> dict:
    """Load (optionally; a str: that tag) with ``workers`` live, report what was restored, train one
    round, save ``tag``; with ``mid_tag``, one more step and a checkpoint inside the next round."""
    if isinstance(load, str):
        engine = build(ds_config({"tau": TAU}, momentum=0.9))
        engine.risgd.identity = workers[rank]
        engine.load_checkpoint(ckpt_dir, tag=load)
        return {}
    engine = _engine(rank, workers, ckpt_dir if load else None)
    out = {"worker": workers[rank], "restored": engine.risgd.restored, "steps": engine.risgd.steps,
           "model": state(engine), "momentum": momentum(engine), "rng": torch.get_rng_state()}
    _train(engine, workers[rank], 2 * TAU)
    out["rng_at_save"] = torch.get_rng_state()
    engine.save_checkpoint(ckpt_dir, tag=tag)
    out.update(saved_model=state(engine), saved_momentum=momentum(engine), saved_steps=engine.risgd.steps,
               live_ranks=engine.risgd.stats()["live_ranks"])
    if mid_tag is not None:
        _train(engine, workers[rank], 1)
        engine.save_checkpoint(ckpt_dir, tag=mid_tag, save_latest=False)
    return out
