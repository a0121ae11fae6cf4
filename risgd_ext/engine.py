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
import sys
import time
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.torch_autocast import autocast_if_enabled

from risgd_common.atomic import atomic_write, write_text_atomic

from .config import ConfigError, RISGDConfig, load_ds_config, split_config
from .controller import RISGDController

RANK_STATE = "risgd_rank{rank:05d}.pt"
# An elastic run keys each rank's state by the manifest worker it serves (``engine.risgd.identity``),
# so the state follows the data, whatever rank number the launcher gives it after a restart.
WORKER_STATE = "risgd_worker{worker:05d}.pt"
# ... and with the node level by worker and the rank's place in its node (each rank its own residual)
NODE_RANK_STATE = "risgd_worker{worker:05d}_local{local:02d}.pt"


class RISGDEngineMixin:
    """Overrides of DeepSpeedEngine methods; ``self.risgd`` is the :class:`RISGDController`.

    A local step takes a lean path when nothing that DeepSpeed's per-step bookkeeping serves is
    configured (``_risgd_lean``, decided once in :func:`attach`): forward calls the module under the
    engine's autocast, backward scales the loss and calls ``loss.backward()``, and step runs
    DeepSpeed's own ``_take_model_step`` (clipping, optimizer, zero_grad, scheduler, counters). What
    it skips are the wall-clock timers, the memory and flops profilers' checks, the monitor, the
    output hooks and engine-backward graph tracking, and repeated ``is_gradient_accumulation_boundary``
    calls: per-step Python work that on a GPU is a fixed cost per step. Synchronous steps (warm-up,
    plain DeepSpeed) keep DeepSpeed's path unchanged.

    On the CPU a lean step releases the gradients at the start of the next backward instead of at
    the end of ``step()`` (until then ``p.grad`` holds the last step's gradients, not ``None``).
    Freed at the end of the step, glibc hands their memory and the activations' back to the
    kernel and the next step faults it in again: 4-5 thousand more page faults and ~5% more CPU
    time per ResNet-20 step. On a GPU the caching allocator has no such cost, and releasing early
    keeps the forward's peak memory lower, so DeepSpeed's order is kept there.
    """

    risgd: RISGDController
    _risgd_lean: bool = False
    _risgd_params: list = []
    _risgd_gas: int = 1
    _risgd_autocast: Any = None  # the torch_autocast dtype, if on
    _risgd_defer_release: bool = False  # CPU: release gradients at the next backward
    _risgd_in_step: bool = False
    _risgd_stale_grads: bool = False

    def forward(self, *args, **kwargs):
        ctl = self.risgd
        if ctl._step_started is None:
            ctl.mark_step_start()
        if self._risgd_lean and not self.enable_backward_allreduce:
            if self._risgd_autocast is None and not torch.is_autocast_enabled():
                return self.module(*args, **kwargs)
            with autocast_if_enabled(self):
                return self.module(*args, **kwargs)
        return super().forward(*args, **kwargs)

    def _forward_prologue(self, inputs, kwargs):
        # DeepSpeed's module pre-hook (timers, profilers); nothing a lean local step needs
        if self._risgd_lean and not self.enable_backward_allreduce:
            return None
        return super()._forward_prologue(inputs, kwargs)

    def _forward_epilogue(self):
        if self._risgd_lean and not self.enable_backward_allreduce:
            return None
        return super()._forward_epilogue()

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
        if self._risgd_stale_grads:  # the last lean step's gradients (CPU): released only now
            self._risgd_stale_grads = False
            for p in self._risgd_params:
                p.grad = None
        if not self._risgd_lean or self.enable_backward_allreduce or self._is_compiled_autograd_enabled:
            return super().backward(loss, retain_graph=retain_graph, scale_wrt_gas=scale_wrt_gas)
        gas = self._risgd_gas
        if scale_wrt_gas and gas != 1:
            loss = loss / gas
        scaler = self.torch_autocast_z0_gradscaler  # fp16 autocast: a per-rank scaler, no collective
        (loss if scaler is None else scaler.scale(loss)).backward(retain_graph=retain_graph)
        return loss

    def step(self, lr_kwargs=None):
        if not self._risgd_lean or self.enable_backward_allreduce:
            boundary = self.is_gradient_accumulation_boundary()
            if boundary and self.risgd.node_gradients_due():
                self.risgd.reduce_node_gradients()
            result = super().step(lr_kwargs)
            if boundary:  # tau counts optimizer steps, not micro-batches
                self.risgd.after_optimizer_step()
            return result
        forced = self._is_gradient_accumulation_boundary  # set_gradient_accumulation_boundary()
        boundary = (self.micro_steps + 1) % self._risgd_gas == 0 if forced is None else forced
        if boundary:
            if self.risgd.node_gradients_due():  # the node level: gradients all-reduced in the node
                self.risgd.reduce_node_gradients()
            self._step_applied = False
            self._risgd_in_step = True
            try:
                self._take_model_step(lr_kwargs)
            finally:
                self._risgd_in_step = False
        self.micro_steps += 1
        if boundary:
            self.risgd.after_optimizer_step()
        return None

    def skip_step(self) -> None:
        """In place of a forward, backward and :meth:`step`, on a worker late at its round's deadline
        (``engine.risgd.skipping``): no update; DeepSpeed's counters, BatchNorm's ``num_batches_tracked`` and the
        learning-rate schedule move on as after a step, and the round's schedule counts it (its round takes this
        worker's average with weight 0, :mod:`risgd_ext.deadline`)."""
        ctl = self.risgd
        if not ctl.skipping:
            ctl.skipped_step()  # raises: one line saying why
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        for m in self.module.modules():  # BatchNorm's step counters count it as a forward would (an int buffer no
            counter = getattr(m, "num_batches_tracked", None)  # round averages: the ranks' models stay equal)
            if m.training and torch.is_tensor(counter) and not counter.is_floating_point():
                counter.add_(self.gradient_accumulation_steps())
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        self.micro_steps += self.gradient_accumulation_steps()
        ctl.skipped_step()

    def zero_grad(self):
        if self._risgd_in_step and self._risgd_defer_release:
            self._risgd_stale_grads = True  # released by the next backward (see the class docstring)
            return None
        if not self._risgd_lean:
            return super().zero_grad()
        for p in self._risgd_params:  # the module's parameters, listed once
            p.grad = None
        return None

    def allreduce_gradients(self, *args, **kwargs):
        # Only reached on synchronous steps; timed for the accounting.
        if not self.is_gradient_accumulation_boundary():
            return super().allreduce_gradients(*args, **kwargs)
        self.risgd.synchronize()
        t0 = time.perf_counter()
        result = super().allreduce_gradients(*args, **kwargs)
        self.risgd.synchronize()
        nbytes = sum(p.grad.numel() * p.grad.element_size() for p in self._risgd_params if p.grad is not None)
        self.risgd.record_gradient_allreduce(nbytes, time.perf_counter() - t0)
        return result

    def clip_fp32_gradients(self):
        if not self.risgd.active:
            return super().clip_fp32_gradients()
        # DeepSpeed's clip all-reduces the norm over ranks (a collective, and it mixes the ranks'
        # gradients). In local steps each rank clips by its own norm; in synchronous steps the
        # gradients are already identical, so the local norm is the global one.
        torch.nn.utils.clip_grad_norm_(self._risgd_params, max_norm=self.gradient_clipping())

    def destroy(self):
        risgd = self.__dict__.get("risgd")  # absent on a partially built engine
        if risgd is not None:
            risgd.warn_unfinished("the engine is destroyed")
            # an overlapped round's collective must not outlive its engine: once the engine is
            # collected, destroy_process_group no longer sees it, and gloo aborts the process at exit
            risgd.settle()
        return super().destroy()

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, rank_state_only=False,
                        **kwargs):
        tag = str(tag if tag is not None else f"global_step{self.global_steps}")
        if rank_state_only:  # a fault-tolerant run's other nodes: their own state; one node writes the rest
            save_rank_state(self, os.path.join(save_dir, tag))
            return True
        # Ranks differ between rounds (and in momentum), but DeepSpeed writes rank 0's model and
        # optimizer only: each rank saves its own state first, so 'latest' (written last by
        # DeepSpeed) never points at a checkpoint that lacks it.
        save_rank_state(self, os.path.join(save_dir, tag))
        client_state = dict(client_state or {})
        client_state["risgd"] = self.risgd.stats()
        # every rank holds the same averaged model here: a worker without state can start from it
        client_state["risgd_at_average"] = self.risgd.is_average() and self.risgd.in_flight is None
        if self.risgd.identity is not None:  # an elastic run: the stamp of this checkpoint's timeline
            client_state["risgd_anchor_stamp"] = anchor_stamp(self.risgd)
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
            load_rank_state(self, os.path.dirname(load_path), at_average=bool(client_state.get("risgd_at_average")),
                            stamp=client_state.get("risgd_anchor_stamp"))
        return load_path, client_state


def _safe_load(path: str, map_location=None) -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def device_rng_state() -> list[torch.Tensor] | None:
    """The accelerator's RNG state for every visible device (``torch.cuda.get_rng_state_all()`` on
    CUDA); ``None`` on a CPU-only machine, whose one generator is saved as ``rng_cpu``."""
    acc = get_accelerator()
    if acc.device_name() == "cpu" or not acc.is_available():
        return None
    return [acc.get_rng_state(i) for i in range(acc.device_count())]


def set_device_rng_state(states: list[torch.Tensor]) -> None:
    """Restore :func:`device_rng_state`'s list; on a machine without the accelerator, or for devices
    it no longer has, nothing is restored."""
    acc = get_accelerator()
    if acc.device_name() == "cpu" or not acc.is_available():
        return
    for i, rng in enumerate(states[:acc.device_count()]):
        acc.set_rng_state(rng, i)


def state_path(tag_dir: str, ctl: Any) -> str:
    """This rank's state file: by manifest worker in an elastic run (``ctl.identity``; with the node level,
    by worker and the rank's place in its node: each rank has its own residual and RNG), else by rank."""
    if ctl.identity is None:
        return os.path.join(tag_dir, RANK_STATE.format(rank=ctl.rank))
    if ctl.node_size > 1:
        return os.path.join(tag_dir, NODE_RANK_STATE.format(worker=ctl.identity, local=ctl.layout.local_of(ctl.rank)))
    return os.path.join(tag_dir, WORKER_STATE.format(worker=ctl.identity))


def save_rank_state(engine: Any, tag_dir: str) -> None:
    """Write this rank's ``risgd_rankNNNNN.pt`` (an elastic run: ``risgd_workerNNNNN.pt``, with
    ``worker``). Format 2: ``rng_device`` (the accelerator's RNG state per device) is present when
    an accelerator is; format 1 files lack it and still load."""
    ctl = engine.risgd
    os.makedirs(tag_dir, exist_ok=True)
    state: dict[str, Any] = {"format": 2, "rank": ctl.rank, "world_size": ctl.world_size,
                             "controller": ctl.state_dict(), "rng_cpu": torch.get_rng_state()}
    if ctl.identity is not None:
        state["worker"] = ctl.identity
        state["anchor_stamp"] = anchor_stamp(ctl)
    rng_device = device_rng_state()
    if rng_device is not None:
        state["rng_device"] = rng_device
    if ctl.active:  # plain DeepSpeed keeps ranks identical: rank 0's files are enough
        state["module"] = engine.module.state_dict()
        state["optimizer"] = engine.optimizer.state_dict()
    atomic_write(state_path(tag_dir, ctl), lambda f: torch.save(state, f))


def anchor_stamp(ctl: Any) -> str | None:
    """A checkpoint's timeline: the fingerprint of the anchor (the last average, the same on every live
    node) as the round's anchor vote takes it (None: no local steps, no anchor)."""
    if ctl.model is None:
        return None
    from .round import anchor_vote

    return ",".join(str(int(v)) for v in anchor_vote(ctl.model, True).tolist()[1::2])


def load_rank_state(engine: Any, tag_dir: str, at_average: bool = False, stamp: str | None = None) -> None:
    ctl = engine.risgd
    path = state_path(tag_dir, ctl)
    if ctl.identity is not None:
        return _load_worker_state(engine, tag_dir, path, at_average, stamp)
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
    if "rng_device" in state:  # format 2, written where an accelerator was
        set_device_rng_state(state["rng_device"])


def _legacy_node_state(tag_dir: str, ctl: Any) -> dict | None:
    """A node-level worker's one file as written before each rank had its own (every rank of the node wrote
    ``risgd_workerNNNNN.pt``, the last one winning): its model and counters serve every rank of the node,
    its residuals only the rank that wrote it."""
    path = os.path.join(tag_dir, WORKER_STATE.format(worker=ctl.identity))
    if ctl.node_size == 1 or not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("rank") != ctl.rank:
        state["controller"] = {k: v for k, v in state["controller"].items() if k not in ("residual", "server_residual")}
    return state


def _load_worker_state(engine: Any, tag_dir: str, path: str, at_average: bool, stamp: str | None = None) -> None:
    """An elastic run: this rank's manifest worker's state, whatever world size wrote it.

    A worker with a file gets its model, optimizer state, schedule counters and RNG back. A worker
    without one (lost when the checkpoint was written, or a replacement) starts from the averaged
    model (DeepSpeed's model file: every rank held the average at an averaging step) with fresh
    optimizer state; it takes the schedule's counters and anchor from another worker's file,
    without that worker's error-feedback residual, and a fresh RNG stream of its own.

    A worker file stamped with another timeline than the checkpoint's (``stamp``, the model files'
    anchor fingerprint: a node that wrote ``stepN`` and was lost before ``latest`` moved, then the run
    wrote ``stepN`` again from an earlier checkpoint without it) is not this worker's state here: it
    is left alone and the worker starts from the average, as a worker without a file.
    """
    ctl = engine.risgd
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if stamp is not None and state.get("anchor_stamp") not in (None, stamp):
            print(f"risgd: {path} belongs to another timeline of this run (its anchor differs from the "
                  f"checkpoint's model files): worker {ctl.identity} starts from the average instead",
                  file=sys.stderr, flush=True)
            state = None
    else:
        state = _legacy_node_state(tag_dir, ctl)
    if state is not None:
        if state.get("worker") != ctl.identity:
            raise ConfigError(f"{path} holds worker {state.get('worker')}'s state, not worker {ctl.identity}'s: "
                              "the checkpoint directory was altered; restore it or start a new run")
        engine.module.load_state_dict(state["module"])
        engine.optimizer.load_state_dict(state["optimizer"])
        ctl.load_state_dict(state["controller"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_device" in state:
            set_device_rng_state(state["rng_device"])
        ctl.restored = "own"
        return
    own = os.path.basename(path)
    others = sorted(n for n in os.listdir(tag_dir) if n.startswith("risgd_worker") and n.endswith(".pt") and n != own)
    if not others:
        raise ConfigError(f"{tag_dir} holds no worker state (risgd_worker*.pt): it was not written by an elastic "
                          "run; resume it with the world size that wrote it")
    if not at_average:
        raise ConfigError(f"{tag_dir} was written inside a round, so it holds no averaged model for worker "
                          f"{ctl.identity}, which has no state there: resume from a checkpoint at an averaging step")
    for name in others:  # the counters and anchor of a worker of this checkpoint's timeline
        state = torch.load(os.path.join(tag_dir, name), map_location="cpu", weights_only=True)
        if stamp is None or state.get("anchor_stamp") in (None, stamp):
            break
    else:
        raise ConfigError(f"{tag_dir}: no worker file there belongs to the checkpoint's timeline (each one's anchor "
                          "differs from the model files'): resume from another checkpoint tag")
    controller = dict(state["controller"])
    controller.pop("residual", None)  # the other worker's compression error is not this worker's
    controller.pop("server_residual", None)  # nor are the sums of the chunks it owned
    engine.optimizer.state.clear()  # DeepSpeed's file carried rank 0's momentum: start without any
    ctl.load_state_dict(controller)
    torch.manual_seed(ctl.identity * 7919 + ctl.steps * 104729 + 1)
    ctl.restored = "average"


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
    quiet_throughput_timer(engine)
    engine._risgd_params = list(engine.module.parameters())
    engine._risgd_gas = engine.gradient_accumulation_steps()
    engine._risgd_autocast = engine.torch_autocast_dtype() if engine.torch_autocast_enabled() else None
    engine.risgd = RISGDController(engine, cfg)
    engine._risgd_lean = cfg is not None and _lean_local_steps(engine)
    engine._risgd_defer_release = engine._risgd_lean and get_accelerator().device_name() == "cpu"
    return engine.risgd


def quiet_throughput_timer(engine: Any) -> None:
    """Turn off DeepSpeed's throughput timer unless the config asks for it ("timers" section).

    It synchronises the device at the start of every forward and the end of every step, only to
    log samples per second every ``steps_per_print`` steps; on a GPU that stalls the pipeline
    twice per step. The extension accounts for compute and communication itself.
    """
    from deepspeed.utils.config import DeepSpeedThroughputTimerConfig

    if "timers" not in (getattr(engine._config, "_param_dict", None) or {}):
        engine.tput_timer.config = DeepSpeedThroughputTimerConfig(enabled=False)


def _lean_local_steps(engine: Any) -> bool:
    """Whether local steps may skip DeepSpeed's per-step bookkeeping: only when none of the
    features it serves is on (and the accumulation boundary is DeepSpeed's managed counter)."""
    wanted = (engine.wall_clock_breakdown(), engine.flops_profiler_enabled(), engine.autotuning_enabled(),
              engine.memory_breakdown(), engine.random_ltd_enabled(), engine.is_deepcompile_enabled(),
              engine.monitor.enabled, engine.tput_timer.config.enabled, getattr(engine, "zenflow", False),
              engine.pipeline_parallelism, engine.checkpoint_engine.is_decoupled(), engine.fp16_auto_cast())
    return engine.managed_gradient_accumulation() and not any(wanted)


def initialize(args: argparse.Namespace | None = None, model: torch.nn.Module | None = None,
               config: str | os.PathLike | dict | None = None, risgd: RISGDConfig | None = None, **kwargs: Any):
    """Drop-in for ``deepspeed.initialize``: same arguments, same return values.

    The DeepSpeed config (``config=`` or ``args.deepspeed_config``) may hold a ``"risgd"`` block;
    without one the engine is plain DeepSpeed (fully synchronous SGD) with the same accounting.
    ``risgd=``: the block already validated (``parse_block``'s result, e.g. the recipe config's),
    used instead of parsing the config's block again on every rank.
    """
    if config is None and args is not None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None  # DeepSpeed refuses a config given twice
    ds_config = load_ds_config(config)
    cfg = None
    if ds_config is not None:
        ds_config, cfg = split_config(ds_config, risgd)
    # DeepSpeed's initial broadcast views every parameter as bytes, which needs stride 1 in the last
    # dimension: channels_last parameters (a 1x1 convolution's weight too, although it counts as
    # contiguous) go through deepspeed.initialize with standard strides and get theirs back before
    # the engine flattens them (keeping them).
    relaid = [(p, p.stride()) for p in (model.parameters() if model is not None else ())
              if p.dim() and p.stride(-1) != 1]
    for p, _ in relaid:
        p.data = p.data.clone(memory_format=torch.contiguous_format)
    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(args=args, model=model, config=ds_config,
                                                                       **kwargs)
    for p, stride in relaid:
        p.data = torch.empty_strided(p.size(), stride, dtype=p.dtype, device=p.device).copy_(p.data)
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
