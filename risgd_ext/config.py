"""The ``"risgd"`` block of a DeepSpeed JSON config: parsing and validation.

Everything is checked before DeepSpeed starts, and every error is one line that names the key and
the fix, so a bad config never costs a cluster allocation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

BLOCK = "risgd"


class ConfigError(ValueError):
    """A ``"risgd"`` block (or the DeepSpeed config around it) that the extension cannot run."""


@dataclass(frozen=True)
class StaticFailure:
    """Ranks ``ranks`` are down for rounds ``start_round <= r < end_round`` (``None``: for good)."""

    ranks: tuple[int, ...]
    start_round: int = 0
    end_round: int | None = None


@dataclass(frozen=True)
class RandomFailure:
    """From ``start_round`` on, each round independently has probability ``prob`` that ``count``
    ranks, drawn at random, are down. Seeded, so every rank agrees without talking."""

    count: int
    prob: float
    seed: int = 0
    start_round: int = 0


@dataclass(frozen=True)
class RISGDConfig:
    tau: int = 1
    warmup_sync_steps: int = 0
    average_buffers: bool = True
    average_optimizer_state: bool = False
    bucket_mb: float = 25.0
    measure_divergence: bool = True
    failures: tuple[StaticFailure | RandomFailure, ...] = field(default_factory=tuple)
    node_size: int = 1        # ranks per node; > 1: a node is one RI-SGD worker (the hierarchy)
    tau_intra: int = 0        # 0: a node's ranks all-reduce gradients every step; k: average every k steps
    overlap: bool = False     # a round's all-reduce runs behind the next local steps
    overlap_delay: int = 0    # steps after a round at which its average is applied; 0: tau (the next round)

    @property
    def bucket_bytes(self) -> int:
        return max(1, int(self.bucket_mb * 1024 * 1024))

    @property
    def hierarchical(self) -> bool:
        return self.node_size > 1

    @property
    def delay(self) -> int:
        """Steps between a round's start (its all-reduce launched) and the step its average is
        applied at, with ``overlap``."""
        return self.overlap_delay or self.tau

    def workers(self, world_size: int) -> int:
        """RI-SGD workers: ranks, or nodes with the hierarchy."""
        return world_size // self.node_size

    def is_intra_average_step(self, step: int) -> bool:
        """Whether step ``step`` ends with an average inside each node only (``tau_intra`` > 0)."""
        return (self.tau_intra > 0 and step > self.warmup_sync_steps
                and (step - self.warmup_sync_steps) % self.tau_intra == 0 and not self.is_average_step(step))

    def is_average_step(self, step: int) -> bool:
        """Whether every rank holds the averaged model after optimizer step ``step`` (1-based):
        each warm-up step is synchronous, and after it a round closes every ``tau`` steps."""
        return step <= self.warmup_sync_steps or (step - self.warmup_sync_steps) % self.tau == 0

    def average_steps_near(self, step: int) -> tuple[int, int]:
        """The last step <= ``step`` and the first step >= ``step`` that end on an average."""
        if self.is_average_step(step):
            return step, step
        below = step - (step - self.warmup_sync_steps) % self.tau
        return below, below + self.tau


_KEYS = {
    "tau": "int >= 1: optimizer steps between parameter averages",
    "warmup_sync_steps": "int >= 0: fully synchronous steps before local steps start",
    "average_buffers": "bool: also average BatchNorm running statistics (default true)",
    "average_optimizer_state": "bool: also average optimizer state such as momentum (default false)",
    "bucket_mb": "number > 0: size of one averaging all_reduce bucket in MiB (default 25)",
    "measure_divergence": "bool: measure the model divergence before each average (default true)",
    "failures": "list of {ranks, start_round, end_round} or {count, prob, seed, start_round} (with node_size > 1 "
                "the entries name workers, i.e. nodes)",
    "node_size": "int >= 1: ranks per node; > 1 makes each node one worker, averaged across nodes every tau",
    "tau_intra": "int >= 0: 0 keeps a node's ranks synchronous (gradient all-reduce in the node every step); "
                 "k >= 1 averages parameters inside the node every k steps (tau must be a multiple)",
    "overlap": "bool: run each round's all-reduce behind the next local steps (one-round-delayed averaging)",
    "overlap_delay": "int >= 0: with overlap, steps after a round at which its average is applied (0: tau)",
}
_STATIC_KEYS = {"ranks", "start_round", "end_round"}
_RANDOM_KEYS = {"count", "prob", "seed", "start_round"}


_DEFAULTS = RISGDConfig()


def _int(block: dict, key: str, default: int, minimum: int, where: str = BLOCK) -> int:
    value = block.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}.{key} must be an int >= {minimum}, got {value!r}: fix it in the ds_config "
                          "(or the recipe key of that name)")
    return value


def _bool(block: dict, key: str, default: bool) -> bool:
    value = block.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{BLOCK}.{key} must be true or false, got {value!r}: fix it in the ds_config "
                          "(or the recipe key of that name)")
    return value


def _parse_failure(entry: Any, i: int) -> StaticFailure | RandomFailure:
    where = f"{BLOCK}.failures[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be an object, got {entry!r}")
    if "ranks" in entry:
        unknown = set(entry) - _STATIC_KEYS
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}: allowed {sorted(_STATIC_KEYS)}")
        ranks = entry["ranks"]
        if not isinstance(ranks, list) or not ranks or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks
        ):
            raise ConfigError(f"{where}.ranks must be a non-empty list of rank numbers, got {ranks!r}")
        start = _int(entry, "start_round", 0, 0, where)
        end = entry.get("end_round")
        if end is not None:
            end = _int(entry, "end_round", 0, start + 1, where)
        return StaticFailure(tuple(sorted(set(ranks))), start, end)
    if "count" in entry:
        unknown = set(entry) - _RANDOM_KEYS
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}: allowed {sorted(_RANDOM_KEYS)}")
        count = _int(entry, "count", 1, 1, where)
        prob = entry.get("prob")
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            raise ConfigError(f"{where}.prob must be a probability in [0, 1], got {prob!r}")
        seed = _int(entry, "seed", 0, 0, where)
        return RandomFailure(count, float(prob), seed, _int(entry, "start_round", 0, 0, where))
    raise ConfigError(f"{where} needs either 'ranks' (fixed failures) or 'count' and 'prob' (random failures)")


def parse_block(block: Any) -> RISGDConfig:
    """Validate a ``"risgd"`` block; raise :class:`ConfigError` with a one-line message."""
    if not isinstance(block, dict):
        raise ConfigError(f"the '{BLOCK}' block must be a JSON object, got {type(block).__name__}")
    unknown = sorted(set(block) - set(_KEYS))
    if unknown:
        allowed = ", ".join(sorted(_KEYS))
        raise ConfigError(f"unknown key(s) {unknown} in the '{BLOCK}' block: allowed keys are {allowed}")
    bucket_mb = block.get("bucket_mb", _DEFAULTS.bucket_mb)
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or bucket_mb <= 0:
        raise ConfigError(f"{BLOCK}.bucket_mb must be a number > 0, got {bucket_mb!r}: fix it in the ds_config")
    failures = block.get("failures", [])
    if not isinstance(failures, list):
        raise ConfigError(f"{BLOCK}.failures must be a list, got {failures!r}")
    d = _DEFAULTS
    cfg = RISGDConfig(
        tau=_int(block, "tau", d.tau, 1),
        warmup_sync_steps=_int(block, "warmup_sync_steps", d.warmup_sync_steps, 0),
        average_buffers=_bool(block, "average_buffers", d.average_buffers),
        average_optimizer_state=_bool(block, "average_optimizer_state", d.average_optimizer_state),
        bucket_mb=float(bucket_mb),
        measure_divergence=_bool(block, "measure_divergence", d.measure_divergence),
        failures=tuple(_parse_failure(f, i) for i, f in enumerate(failures)),
        node_size=_int(block, "node_size", d.node_size, 1),
        tau_intra=_int(block, "tau_intra", d.tau_intra, 0),
        overlap=_bool(block, "overlap", d.overlap),
        overlap_delay=_int(block, "overlap_delay", d.overlap_delay, 0),
    )
    _check_combinations(cfg)
    return cfg


def _check_combinations(cfg: RISGDConfig) -> None:
    if cfg.tau_intra and not cfg.hierarchical:
        raise ConfigError(f"{BLOCK}.tau_intra={cfg.tau_intra} needs a node level: set {BLOCK}.node_size to the "
                          "ranks per node (> 1) or leave tau_intra out")
    if cfg.tau_intra and cfg.tau % cfg.tau_intra:
        raise ConfigError(f"{BLOCK}.tau={cfg.tau} must be a multiple of {BLOCK}.tau_intra={cfg.tau_intra}, so that "
                          "rounds across nodes close on an intra-node average: change one of them")
    if cfg.overlap_delay and not cfg.overlap:
        raise ConfigError(f"{BLOCK}.overlap_delay={cfg.overlap_delay} only applies with {BLOCK}.overlap=true: set "
                          "overlap or leave overlap_delay out")
    if cfg.overlap_delay > cfg.tau:
        raise ConfigError(f"{BLOCK}.overlap_delay={cfg.overlap_delay} must be <= tau={cfg.tau}: a round's average "
                          "is applied before the next round starts")
    if cfg.average_optimizer_state and (cfg.overlap or cfg.hierarchical):
        raise ConfigError(f"{BLOCK}.average_optimizer_state is not supported with node_size > 1 or overlap: "
                          "leave one of them out")


def check_deepspeed_config(ds_config: dict) -> None:
    """Refuse the DeepSpeed features that cannot take independent local steps."""
    zero = ds_config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage and int(stage) >= 1:
        raise ConfigError(
            f"zero_optimization.stage={stage} partitions optimizer state across ranks, so ranks cannot "
            "take independent local steps: set zero_optimization.stage to 0 or remove the 'risgd' block"
        )
    for key in ("fp16", "bf16", "bfloat16"):
        section = ds_config.get(key)
        if isinstance(section, dict) and section.get("enabled", False) in (True, "auto"):
            raise ConfigError(
                f"'{key}.enabled' wraps the optimizer in DeepSpeed's mixed-precision optimizer, whose overflow "
                "check and clipping are collectives on every step: use \"torch_autocast\": "
                '{"enabled": true, "dtype": "bfloat16"} (fp32 weights, low-precision compute) instead'
            )
    if "pipeline" in ds_config and ds_config.get("pipeline", {}).get("stages", 1) not in (1, "auto"):
        raise ConfigError("pipeline parallelism is not supported with the 'risgd' block: remove one of them")


def check_world(cfg: RISGDConfig, world_size: int) -> None:
    """Checks that need the world size (known only once the process group exists)."""
    if world_size % cfg.node_size:
        raise ConfigError(f"{BLOCK}.node_size={cfg.node_size} does not divide the {world_size} ranks: set it to the "
                          "ranks per node (the launcher's --num_gpus / slots)")
    unit = "ranks"
    if cfg.hierarchical:  # failures name workers (nodes), checked against their number
        world_size, unit = cfg.workers(world_size), "workers (nodes)"
    for i, failure in enumerate(cfg.failures):
        where = f"{BLOCK}.failures[{i}]"
        if isinstance(failure, StaticFailure):
            bad = [r for r in failure.ranks if r >= world_size]
            if bad:
                raise ConfigError(f"{where}.ranks {bad} do not exist in a world of {world_size} {unit}")
            if len(failure.ranks) >= world_size:
                raise ConfigError(f"{where} fails all {world_size} {unit}: at least one must stay live")
        elif failure.count >= world_size:
            raise ConfigError(
                f"{where}.count={failure.count} must be < the world size {world_size} ({unit}): one must stay live"
            )


def load_ds_config(config: str | os.PathLike | dict | None) -> dict | None:
    """A DeepSpeed config as a dict (a path is read as JSON), or None."""
    if config is None or isinstance(config, dict):
        return config
    path = os.fspath(config)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} not found: pass an existing JSON file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({e}): fix the file") from None


def split_config(ds_config: dict) -> tuple[dict, RISGDConfig | None]:
    """Return (the config DeepSpeed sees, the validated risgd block or None)."""
    ds_config = dict(ds_config)
    block = ds_config.pop(BLOCK, None)
    if block is None:
        return ds_config, None
    cfg = parse_block(block)
    check_deepspeed_config(ds_config)
    return ds_config, cfg
