"""Soak: many averaging rounds with random failures on one rank of a real gloo group."""

from __future__ import annotations

import hashlib

import psutil
import torch

from tests.engine_workers import build, ds_config, train_step

ROUNDS = 200


def soak(rank: int, world_size: int) -> dict:
    engine = build(ds_config({"tau": 1, "failures": [{"count": 1, "prob": 0.3, "seed": 3}]}, momentum=0.9))
    digests, live, rss = [], [], {}
    for step in range(ROUNDS):
        train_step(engine, rank, step)
        flat = torch.cat([v.detach().flatten().double() for v in engine.module.state_dict().values()])
        digests.append(hashlib.sha256(flat.numpy().tobytes()).hexdigest())
        live.append(engine.risgd.live_ranks)
        if step + 1 in (20, ROUNDS):  # after warm-up of allocators, and at the end
            rss[step + 1] = psutil.Process().memory_info().rss
    return {"digests": digests, "live": live, "rss": rss, "stats": engine.risgd.stats()}
