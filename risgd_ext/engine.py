"""``risgd_ext.initialize``: ``deepspeed.initialize`` with local steps and periodic averaging.

The engine DeepSpeed builds is kept; its class is swapped for a subclass that adds the
RI-SGD schedule (the same move DeepSpeed's 1-bit Adam makes: turn ``enable_backward_allreduce``
off and run our own collective). Nothing else in the user's script changes.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import time
from typing import Any

import deepspeed
import torch

from risgd_common.atomic import atomic_write, write_text_atomic

from .config import ConfigError, load_ds_config, split_config
from .controller import RISGDController

RANK_STATE = "risgd_rank{rank:05d}.pt"


class RISGDEngineMixin:
    """Overrides of DeepSpeedEngine methods; ``self.risgd`` is the :class:`RISGDController`."""

    risgd: RISGDController

    def forward(self, *args, **kwargs):
        self.risgd.mark_step_start()
        return super().forward(*args, **kwargs)

    def step(self, lr_kwargs=None):
        boundary = self.is_gradient_accumulation_boundary()
        result = super().step(lr_kwargs)
        if boundary:  # tau counts optimizer steps, not micro-batches
            self.risgd.after_optimizer_step()
        return result

    def allreduce_gradients(self, *args, **kwargs):
        # Only reached on synchronous steps; timed for the accounting.
        if not self.is_gradient_accumulation_boundary():
            return super().allreduce_gradients(*args, **kwargs)
        self.risgd.synchronize()
        t0 = time.perf_counter()
        result = super().allreduce_gradients(*args, **kwargs)
        self.risgd.synchronize()
        nbytes = sum(p.grad.numel() * p.grad.element_size() for p in self.module.parameters() if p.grad is not None)
        self.risgd.record_gradient_allreduce(nbytes, time.perf_counter() - t0)
        return result

    def clip_fp32_gradients(self):
        if not self.risgd.active:
            return super().clip_fp32_gradients()
        # DeepSpeed's clip all-reduces the norm over ranks (a collective, and it mixes the ranks'
        # gradients). In local steps each rank clips by its own norm; in synchronous steps the
        # gradients are already identical, so the local norm is the global one.
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm=self.gradient_clipping())

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
        tag = str(tag if tag is not None else f"global_step{self.global_steps}")
        # Ranks differ between rounds (and in momentum), but DeepSpeed writes rank 0's model and
        # optimizer only: each rank saves its own state first, so 'latest' (written last by
        # DeepSpeed) never points at a checkpoint that lacks it.
        save_rank_state(self, os.path.join(save_dir, tag))
        client_state = dict(client_state or {})
        client_state["risgd"] = self.risgd.stats()
        result = super().save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False, **kwargs)
        if save_latest:
            # DeepSpeed writes 'latest' in place; a crash mid-write would leave it empty. Replace it
            # atomically, after every rank has finished writing the tag.
            if self.global_rank == 0:
                write_text_atomic(os.path.join(save_dir, "latest"), tag)
            torch.distributed.barrier()
        return result

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        # DeepSpeed unpickles its checkpoint files with weights_only=False (arbitrary code on load);
        # read them with the safe unpickler instead: they hold only tensors and plain values.
        self.checkpoint_engine.load = _safe_load
        load_path, client_state = super().load_checkpoint(load_dir, tag=tag, **kwargs)
        if load_path is not None:
            load_rank_state(self, os.path.dirname(load_path))
        return load_path, client_state


def _safe_load(path: str, map_location=None) -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def save_rank_state(engine: Any, tag_dir: str) -> None:
    ctl = engine.risgd
    os.makedirs(tag_dir, exist_ok=True)
    state: dict[str, Any] = {"format": 1, "rank": ctl.rank, "world_size": ctl.world_size,
                             "controller": ctl.state_dict(), "rng_cpu": torch.get_rng_state()}
    if ctl.active:  # plain DeepSpeed keeps ranks identical: rank 0's files are enough
        state["module"] = engine.module.state_dict()
        state["optimizer"] = engine.optimizer.state_dict()
    atomic_write(os.path.join(tag_dir, RANK_STATE.format(rank=ctl.rank)), lambda f: torch.save(state, f))


def load_rank_state(engine: Any, tag_dir: str) -> None:
    ctl = engine.risgd
    path = os.path.join(tag_dir, RANK_STATE.format(rank=ctl.rank))
    if not os.path.exists(path):
        if ctl.active:
            raise ConfigError(f"{path} is missing: this checkpoint was not written by risgd_ext with "
                              f"{ctl.world_size} ranks; resume with the world size that wrote it")
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["world_size"] != ctl.world_size:
        raise ConfigError(f"{path} was written by {state['world_size']} ranks, this run has {ctl.world_size}: "
                          "resume with the same world size")
    if "module" in state:
        engine.module.load_state_dict(state["module"])
        engine.optimizer.load_state_dict(state["optimizer"])
    ctl.load_state_dict(state["controller"])
    torch.set_rng_state(state["rng_cpu"])


_SUBCLASSES: dict[type, type] = {}


def attach(engine: Any, cfg) -> RISGDController:
    """Give a DeepSpeed engine the RI-SGD schedule (``cfg=None``: plain DeepSpeed, accounting only)."""
    if cfg is not None and (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization()):
        raise ConfigError("the 'risgd' block needs ZeRO stage 0 and fp32 weights (torch_autocast for low "
                          "precision): remove fp16/bf16 sections and set zero_optimization.stage to 0")
    base = type(engine)
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"RISGD{base.__name__}", (RISGDEngineMixin, base), {})
    engine.__class__ = _SUBCLASSES[base]
    engine.risgd = RISGDController(engine, cfg)
    return engine.risgd


def initialize(args: argparse.Namespace | None = None, model: torch.nn.Module | None = None,
               config: str | os.PathLike | dict | None = None, **kwargs: Any):
    """Drop-in for ``deepspeed.initialize``: same arguments, same return values.

    The DeepSpeed config (``config=`` or ``args.deepspeed_config``) may hold a ``"risgd"`` block;
    without one the engine is plain DeepSpeed (fully synchronous SGD) with the same accounting.
    """
    if config is None and args is not None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None  # DeepSpeed refuses a config given twice
    ds_config = load_ds_config(config)
    cfg = None
    if ds_config is not None:
        ds_config, cfg = split_config(ds_config)
    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(args=args, model=model, config=ds_config,
                                                                       **kwargs)
    attach(engine, cfg)
    release_shm_buffer()
    return engine, optimizer, dataloader, lr_scheduler


def init_distributed(timeout: datetime.timedelta | None = None, **kwargs: Any) -> None:
    """``deepspeed.init_distributed`` on the accelerator's backend, leaving nothing behind.

    On a CPU machine DeepSpeed's shared-memory all-reduce creates a ~66 MB file per rank in
    /dev/shm when the process group starts and never removes it. Its name is unlinked here, right
    after every rank has mapped its peers' buffers, so a process that fails later, however it
    dies, leaks nothing. Call this instead of ``deepspeed.init_distributed`` in a script that can
    fail between starting the process group and :func:`initialize`.
    """
    from deepspeed.accelerator import get_accelerator

    if timeout is not None:
        kwargs["timeout"] = timeout
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), **kwargs)
    release_shm_buffer()


def release_shm_buffer() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU shared-memory all-reduce.

    DeepSpeed creates one (~66 MB) per rank, named by master address and port, and never removes
    it, so every run on a CPU machine leaks RAM-backed files. Once all ranks have mapped each
    other's buffers (after a barrier) the name is no longer needed; the memory stays mapped until
    the process exits, then it is freed.
    """
    import glob

    if not torch.distributed.is_initialized():
        return
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    local_rank = os.environ.get("LOCAL_RANK", "0")
    paths = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{local_rank}") if addr and port else []
    if not paths:
        return
    torch.distributed.barrier()
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
