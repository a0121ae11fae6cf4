"""Scenarios run inside each rank of a real gloo group (see risgd_hosts.local.run_ranks).

Each scenario builds a fresh engine with risgd_ext.initialize or deepspeed.initialize and returns
plain data (tensors, counters) for the test process to compare across ranks.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings

import deepspeed
import torch
import torch.distributed as dist

import risgd_ext

# Every torch.distributed entry point that communicates.
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
    "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce", "gather", "scatter", "barrier",
    "monitored_barrier", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "broadcast_object_list", "all_gather_object",
)


@contextlib.contextmanager
def observe_collectives(names, on_call):
    """Call ``on_call(name, args, kwargs)`` before every call of the named torch.distributed
    functions (DeepSpeed's comm layer calls these too), inside the block."""
    originals = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def wrap(name, fn):
        def observed(*args, **kwargs):
            on_call(name, args, kwargs)
            return fn(*args, **kwargs)
        return observed

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def count_collectives():
    """Count calls of every torch.distributed collective."""
    counts: dict[str, int] = {}

    def count(name, args, kwargs):
        counts[name] = counts.get(name, 0) + 1

    with observe_collectives(COLLECTIVES, count):
        yield counts


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.BatchNorm1d(24), torch.nn.ReLU(),
                               torch.nn.Linear(24, 3))


def batch(rank: int, step: int, same_data: bool = False, size: int = 8):
    """A deterministic batch per (rank, step): resume needs nothing but the step number."""
    g = torch.Generator().manual_seed(1000 * step + (0 if same_data else rank + 1))
    return torch.randn(size, 12, generator=g), torch.randint(0, 3, (size,), generator=g)


def ds_config(risgd: dict | None = None, momentum: float = 0.0, gas: int = 1, **extra) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": gas,
           "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": momentum}},
           "gradient_clipping": 1.0, "steps_per_print": 10**9}
    cfg.update(extra)
    if risgd is not None:
        cfg["risgd"] = risgd
    return cfg


def build(cfg: dict, use_risgd: bool = True):
    model = make_model()
    init = risgd_ext.initialize if use_risgd else deepspeed.initialize
    engine, *_ = init(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def train_step(engine, rank: int, step: int, same_data: bool = False) -> None:
    x, y = batch(rank, step, same_data)
    loss = torch.nn.functional.cross_entropy(engine(x), y)
    engine.backward(loss)
    engine.step()


def state(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def momentum(engine) -> list[torch.Tensor]:
    opt = engine.optimizer
    return [opt.state[p]["momentum_buffer"].clone() for p in engine.module.parameters() if p in opt.state]


# -- scenarios ------------------------------------------------------------------------------------

def scenario_sync_equivalence(rank: int, steps: int = 6) -> dict:
    """tau=1 local SGD (no momentum) vs plain DeepSpeed's gradient all-reduce, same data per rank
    and different data per rank."""
    out = {}
    for same in (True, False):
        local = build(ds_config({"tau": 1, "average_buffers": False}, gradient_clipping=0.0))
        plain = build(ds_config(gradient_clipping=0.0), use_risgd=False)
        for s in range(steps):
            train_step(local, rank, s, same)
            train_step(plain, rank, s, same)
        key = "same" if same else "different"
        out[key] = (list(local.module.parameters()), list(plain.module.parameters()))
        out[key] = ([p.detach().clone() for p in out[key][0]], [p.detach().clone() for p in out[key][1]])
    return out


def scenario_rounds_and_collectives(rank: int, tau: int = 4, rounds: int = 2) -> dict:
    """Per-step collective counts and states for local steps, plus plain DeepSpeed as control."""
    out = {}
    for name, cfg, use_risgd in (
        ("risgd", ds_config({"tau": tau}, momentum=0.9), True),
        ("risgd_small_buckets", ds_config({"tau": tau, "bucket_mb": 0.0005}), True),
        ("risgd_autocast_bf16", ds_config({"tau": tau}, torch_autocast={"enabled": True, "dtype": "bfloat16"}), True),
        ("plain", ds_config(momentum=0.9), False),
    ):
        engine = build(cfg, use_risgd)
        counts, states, stats = [], [], []
        for s in range(tau * rounds):
            with count_collectives() as c:
                train_step(engine, rank, s)
            counts.append(dict(c))
            states.append(state(engine))
            stats.append(engine.risgd.stats() if use_risgd else None)
        out[name] = {"counts": counts, "states": states, "stats": stats, "lean": getattr(engine, "_risgd_lean", None)}
    return out


def scenario_gradient_accumulation(rank: int, tau: int = 3, gas: int = 2) -> dict:
    engine = build(ds_config({"tau": tau}, gas=gas))
    counts, rounds = [], []
    for micro in range(2 * tau * gas):
        with count_collectives() as c:
            train_step(engine, rank, micro)
        counts.append(sum(c.values()))
        rounds.append(engine.risgd.stats()["rounds"])
    return {"counts": counts, "rounds": rounds, "stats": engine.risgd.stats()}


def scenario_warmup(rank: int, warmup: int = 3, tau: int = 2) -> dict:
    engine = build(ds_config({"tau": tau, "warmup_sync_steps": warmup}))
    counts, states, averaged, consensus, agreed = [], [], [], [], []
    for s in range(warmup + 2 * tau):
        with count_collectives() as c:
            train_step(engine, rank, s)
        counts.append(dict(c))
        states.append(state(engine))
        averaged.append(engine.risgd.is_average())
        try:  # mid-round, consensus() refuses instead of handing back this rank's local model
            engine.risgd.consensus()
            consensus.append("ok")
            agreed.append(state(engine))
        except RuntimeError as e:
            consensus.append(str(e))
            agreed.append(None)
    return {"counts": counts, "states": states, "stats": engine.risgd.stats(), "averaged": averaged,
            "consensus": consensus, "agreed": agreed}


def scenario_momentum(rank: int, tau: int = 3) -> dict:
    out = {}
    for flag in (True, False):
        engine = build(ds_config({"tau": tau, "average_optimizer_state": flag}, momentum=0.9))
        for s in range(tau):
            train_step(engine, rank, s)
        out[flag] = momentum(engine)
    return out


def scenario_failures(rank: int, tau: int = 2) -> dict:
    """Rank 1 is down in round 1 only; snapshot every rank just before each average."""
    engine = build(ds_config({"tau": tau, "failures": [{"ranks": [1], "start_round": 1, "end_round": 2}]}))
    ctl = engine.risgd
    before, after, divergence, live = [], [], [], []
    original = ctl.average

    def snapshotting_average():
        before.append([p.detach().clone() for p in ctl.params()])
        original()
        after.append([p.detach().clone() for p in ctl.params()])
        divergence.append(ctl.divergence)
        live.append(ctl.live_ranks)

    ctl.average = snapshotting_average
    for s in range(3 * tau):
        train_step(engine, rank, s)
    return {"before": before, "after": after, "divergence": divergence, "live": live, "stats": ctl.stats()}


def scenario_resume(rank: int, ckpt_dir: str, block: dict | None = None, total: int = 10, save_at: int = 6) -> dict:
    """Save mid-round (with a round in flight, for overlap) at step ``save_at``, resume in a fresh engine,
    finish at ``total``; compare with an uninterrupted run, before and after consensus(). The one resume
    scenario of the suite (engine, node level and overlap, outer step and codecs: ``block``)."""
    cfg = ds_config(block if block is not None else {"tau": 4}, momentum=0.9)
    straight = build(cfg)
    for s in range(total):
        train_step(straight, rank, s)
        if s + 1 == save_at:
            straight.save_checkpoint(ckpt_dir, tag="mid")
    pending_at_end = straight.risgd.in_flight is not None
    resumed = build(cfg)
    torch.manual_seed(12345)  # a different RNG position: the checkpoint must restore it
    path, client_state = resumed.load_checkpoint(ckpt_dir)
    start = resumed.risgd.stats()["steps"]
    for s in range(start, total):
        train_step(resumed, rank, s)
    stats = (straight.risgd.stats(), resumed.risgd.stats())
    out = {"straight": state(straight), "resumed": state(resumed), "start": start,
           "stats": stats, "stats_straight": stats[0], "stats_resumed": stats[1],
           "client_state_rounds": client_state["risgd"]["rounds"], "path": path, "pending_at_end": pending_at_end,
           "latest": open(os.path.join(ckpt_dir, "latest")).read(),
           "files": sorted(os.listdir(ckpt_dir)) + sorted(os.listdir(os.path.join(ckpt_dir, "mid")))}
    if straight.risgd.is_average():  # consensus() only where it may be called (not inside a round)
        final = (straight.risgd.consensus(), resumed.risgd.consensus())
        out["final"] = (state(straight), state(resumed))
        out["final_rounds"] = (final[0]["rounds"], final[1]["rounds"])
    return out


class _Evil:
    """A pickle that runs code on load (writes a marker file) unless loading is weights-only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def scenario_malicious_checkpoint(rank: int, ckpt_dir: str) -> dict:
    engine = build(ds_config({"tau": 2}))
    marker = os.path.join(ckpt_dir, "pwned")
    if rank == 0:
        os.makedirs(os.path.join(ckpt_dir, "evil"), exist_ok=True)
        torch.save({"module": _Evil(marker)}, os.path.join(ckpt_dir, "evil", "mp_rank_00_model_states.pt"))
    dist.barrier()
    try:
        engine.load_checkpoint(ckpt_dir, tag="evil")
        refused = ""
    except Exception as e:  # torch's UnpicklingError, raised before any code runs
        refused = type(e).__name__
    dist.barrier()
    return {"refused": refused, "marker_exists": os.path.exists(marker)}


def scenario_lean_local_steps(rank: int, tau: int = 3, gas: int = 2) -> dict:
    """Local steps on the lean path vs DeepSpeed's own per-step path (forced by asking for its
    throughput timer): same states bit for bit, same DeepSpeed counters and learning rates."""
    scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.05, "warmup_num_steps": 4}}
    out = {}
    for name, extra in (("lean", {}), ("deepspeed", {"timers": {"throughput": {"enabled": True,
                                                                               "synchronized": False}}})):
        engine = build(ds_config({"tau": tau, "warmup_sync_steps": 2}, momentum=0.9, gas=gas, scheduler=scheduler,
                                 **extra))
        states, counters, grads_after_step = [], [], []
        for micro in range((2 + 2 * tau) * gas):
            train_step(engine, rank, micro)
            states.append(state(engine))
            counters.append((engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps,
                             engine.get_lr()[0], engine.risgd.stats()["steps"]))
            grads_after_step.append(any(p.grad is not None for p in engine.module.parameters()))
        out[name] = {"lean": engine._risgd_lean, "tput_timer": engine.tput_timer.config.enabled, "states": states,
                     "counters": counters, "grads_after_step": grads_after_step,
                     "compute_seconds": engine.risgd.stats()["compute_seconds"]}
    return out


def scenario_channels_last(rank: int, tau: int = 2) -> dict:
    """A channels_last conv model: initialize works (DeepSpeed's broadcast needs contiguous
    parameters), the weights keep their layout in the flat buffer, rounds still agree."""
    out = {}
    for name, block in (("risgd", {"tau": tau}), ("plain", None)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        model = model.to(memory_format=torch.channels_last)
        engine, *_ = risgd_ext.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config(block, momentum=0.9))
        layouts, states = [], []
        for s in range(2 * tau):
            g = torch.Generator().manual_seed(1000 * s + rank)
            x = torch.randn(8, 3, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 3, (8,), generator=g)
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            engine.step()
            layouts.append(engine.module[0].weight.is_contiguous(memory_format=torch.channels_last))
            states.append(state(engine))
        out[name] = {"layouts": layouts, "states": states, "bytes": engine.risgd.stats()["bytes_allreduced"]}
    return out


def scenario_plain_buffers(rank: int) -> dict:
    """Plain DeepSpeed leaves BatchNorm statistics per rank; consensus() makes them agree."""
    engine = build(ds_config())  # risgd_ext without a 'risgd' block: plain DeepSpeed
    for s in range(2):
        train_step(engine, rank, s)
    before = {k: v.clone() for k, v in state(engine).items() if "running" in k}
    assert engine.risgd.is_average()  # synchronous: every step ends on an average
    engine.risgd.consensus()
    after = {k: v.clone() for k, v in state(engine).items() if "running" in k}
    return {"before": before, "after": after}


def _caught(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if "risgd_ext" in str(w.message)]


def scenario_forgotten_consensus(rank: int) -> dict:
    """A forgotten consensus() is not silent: the engine warns once, on every rank, when it is destroyed
    or the process group is, while the ranks hold different models. Destroys the process group: last."""
    out = {}
    in_flight = build(ds_config({"tau": 2, "overlap": True}))
    for s in range(2):
        train_step(in_flight, rank, s)
    out["in_flight"] = _caught(in_flight.destroy)
    mid_round = build(ds_config({"tau": 4}))
    for s in range(3):
        train_step(mid_round, rank, s)
    out["mid_round"] = _caught(mid_round.destroy)
    out["again"] = _caught(mid_round.destroy)  # once
    done = build(ds_config({"tau": 2, "overlap": True}))
    for s in range(2):
        train_step(done, rank, s)
    done.risgd.consensus()
    out["after_consensus"] = _caught(done.destroy)
    left = build(ds_config({"tau": 2, "overlap": True}))
    for s in range(2):
        train_step(left, rank, s)
    out["process_group"] = _caught(dist.destroy_process_group)
    return out


def run_all(rank: int, world_size: int, ckpt_dir: str) -> dict:
    return {
        "sync_equivalence": scenario_sync_equivalence(rank),
        "rounds": scenario_rounds_and_collectives(rank),
        "gas": scenario_gradient_accumulation(rank),
        "warmup": scenario_warmup(rank),
        "momentum": scenario_momentum(rank),
        "failures": scenario_failures(rank),
        "resume": scenario_resume(rank, ckpt_dir),
        "plain_buffers": scenario_plain_buffers(rank),
        "lean": scenario_lean_local_steps(rank),
        "channels_last": scenario_channels_last(rank),
        "malicious": scenario_malicious_checkpoint(rank, ckpt_dir),
        "forgotten_consensus": scenario_forgotten_consensus(rank),  # last: it destroys the process group
    }


def scenario_silent_peer(rank: int, world_size: int, timeout_s: float) -> dict:
    """The process group starts with ``timeout_s``; rank 1 then goes silent (alive, its sockets
    open, never joining a collective: a host whose link went down). Rank 0 trains to its first
    round and returns how long the round took to fail, and the timeouts of the world and of the
    engine's data-parallel group."""
    import datetime
    import time

    from risgd_ext.topology import world_timeout

    risgd_ext.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    engine = build(ds_config({"tau": 2}))
    group = engine.data_parallel_group
    group_timeout = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    # rank 0 says through a file when its round has failed; until then rank 1 stays silent (at most
    # timeout_s + 20 s: rank 0's round must give up long before), then leaves at once
    done = os.path.join(tempfile.gettempdir(), f"risgd-silent-peer-{os.environ['MASTER_PORT']}")
    if rank == 1:
        deadline = time.monotonic() + timeout_s + 20
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"group_timeout_s": group_timeout}
    train_step(engine, rank, 0)
    t0 = time.monotonic()
    try:
        train_step(engine, rank, 1)  # step 2 of tau=2: the round, which rank 1 never joins
        error = None
    except RuntimeError as e:
        error = str(e).splitlines()[0]
    failed_after = time.monotonic() - t0
    open(done, "w").close()
    return {"failed_after_s": failed_after, "error": error, "group_timeout_s": group_timeout,
            "world_timeout_s": world_timeout().total_seconds(), "same_group": group is dist.group.WORLD}
