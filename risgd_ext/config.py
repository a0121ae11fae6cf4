"""The ``"risgd"`` block of a DeepSpeed JSON config: parsing and validation.

Everything is checked before DeepSpeed starts, and every error is one line that names the key and
the fix, so a bad config never costs a cluster allocation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from risgd_common.bounds import (
    FLAG,
    FRACTION,
    NON_NEGATIVE_NUMBER,
    POSITIVE_NUMBER,
    POSITIVE_SECONDS,
    PROBABILITY,
    KeyCheck,
    at_least,
    one_of,
)
from risgd_common.layout import Layout, LayoutError

from . import codec_int2, codec_topk  # noqa: F401  (each registers its codec: the validator knows them all)
from .codec import CODECS

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


# -- validators: (key, value) -> the parsed value, or ConfigError with one line. Each bound (an int >= k,
# a number of seconds > 0, a fraction, ...) is written once, in risgd_common.bounds, which the recipe
# layer checks with too ------------------------------------------------------------------------------
_FIX = "fix it in the ds_config (or the recipe key of that name)"


def _int(minimum: int, where: str = BLOCK) -> KeyCheck:
    return KeyCheck(at_least(minimum), f"{where}.", _FIX, ConfigError)


_bool = KeyCheck(FLAG, f"{BLOCK}.", _FIX, ConfigError)
_positive_number = KeyCheck(POSITIVE_NUMBER, f"{BLOCK}.", "fix it in the ds_config", ConfigError)
_seconds = KeyCheck(POSITIVE_SECONDS, f"{BLOCK}.", "fix it in the ds_config", ConfigError)
_fraction = KeyCheck(FRACTION, f"{BLOCK}.", _FIX, ConfigError)
_non_negative = KeyCheck(NON_NEGATIVE_NUMBER, f"{BLOCK}.", _FIX, ConfigError)


def _one_of(choices) -> KeyCheck:
    """A validator of one of ``choices`` (a tuple, or a registry dict read at each check)."""
    return KeyCheck(one_of(choices), f"{BLOCK}.", _FIX, ConfigError)


# a compress value: a registered codec's name, or one of its variants (topk0.01), read at each check
_codec = KeyCheck(one_of(CODECS, "one of " + CODECS.described()), f"{BLOCK}.", _FIX, ConfigError)


def _failures(key: str, value: Any) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{BLOCK}.{key} must be a list, got {value!r}")
    return tuple(f if isinstance(f, (StaticFailure, RandomFailure)) else _parse_failure(f, i)
                 for i, f in enumerate(value))


def key(default: Any, check, help: str, recipe: str | None = None, **kw: Any):
    """One engine key: its default, its validator and one line of help, declared once.

    ``recipe``: whether the recipe has a key of this name, and how the ds_config writer puts it in
    the ``risgd`` block: ``"always"``, ``"when_set"`` (only when it differs from the default, so a
    flat run's block stays as it was before the key existed), or None (not a recipe key)."""
    meta = {"check": check, "help": help, "recipe": recipe}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class RISGDConfig:
    """The validated ``"risgd"`` block. Each field is one key of the block (see :func:`key`)."""

    tau: int = key(1, _int(1), "int >= 1: optimizer steps between parameter averages", "always")
    warmup_sync_steps: int = key(0, _int(0), "int >= 0: fully synchronous steps before local steps start",
                                 "always")
    average_buffers: bool = key(True, _bool, "bool: also average BatchNorm running statistics (default true)")
    average_optimizer_state: bool = key(False, _bool, "bool: also average optimizer state such as momentum "
                                        "(default false)", "always")
    bucket_mb: float = key(25.0, _positive_number, "number > 0: size of one averaging all_reduce bucket in MiB "
                           "(default 25)")
    measure_divergence: bool = key(True, _bool, "bool: measure the model divergence before each average "
                                   "(default true)")
    failures: tuple[StaticFailure | RandomFailure, ...] = key(
        (), _failures, "list of {ranks, start_round, end_round} or {count, prob, seed, start_round} (with "
        "node_size > 1 the entries name workers, i.e. nodes)", "always")
    node_size: int = key(1, _int(1), "int >= 1: ranks per node; > 1 makes each node one worker, averaged across "
                         "nodes every tau", "when_set")
    tau_intra: int = key(0, _int(0), "int >= 0: 0 keeps a node's ranks synchronous (gradient all-reduce in the "
                         "node every step); k >= 1 averages parameters inside the node every k steps (tau must "
                         "be a multiple)", "when_set")
    overlap: bool = key(False, _bool, "bool: run each round's all-reduce behind the next local steps "
                        "(one-round-delayed averaging)", "when_set")
    overlap_delay: int = key(0, _int(0), "int >= 0: with overlap, steps after a round at which its average is "
                             "applied (0: tau)", "when_set")
    outer_lr: float = key(1.0, _positive_number, "number > 0: the outer SGD step's learning rate on the round's "
                          "pseudo-gradient a - mean_j x_j (1 with momentum 0: plain averaging, bitwise)", "when_set")
    outer_momentum: float = key(0.0, _fraction, "number in [0, 1): the outer SGD step's momentum (its buffer is "
                                "in the checkpoint)", "when_set")
    outer_nesterov: bool = key(False, _bool, "bool: Nesterov momentum for the outer step (needs outer_momentum "
                               "> 0)", "when_set")
    compress: str = key("none", _codec, "none | bf16 | int8 | int4 | int2 | topk | topkF: how a round's parameter "
                        "displacement crosses between nodes (int8: one fp32 scale per 256 values; int4: two values "
                        "a byte, one scale per 128; int2: ternary, four values a byte, one scale per 128; topk: "
                        "the 1/32 largest of each chunk, int32 indices and bf16 values; topkF: the fraction F in "
                        "(0, 0.5], e.g. topk0.01; a two-phase all-reduce: chunks to their owners, summed there in "
                        "fp32, re-encoded once, all-gathered)", "when_set")
    error_feedback: bool = key(True, _bool, "bool: with compress, each rank adds what encoding dropped to its "
                               "next payload, and each chunk's owner what re-encoding the sum dropped to its next "
                               "sum (both residuals are in the checkpoint)", "when_set")
    fault_tolerance: str = key("none", _one_of(("none", "torchft")), "none | torchft: torchft keeps the nodes "
                               "that are live (one replica group per node, a quorum at every round, a failed round "
                               "retried among the survivors, a joiner healed from a live peer); the lighthouse's "
                               "address in TORCHFT_LIGHTHOUSE; each node calls engine.risgd.go_live() (the trainer "
                               "sets it for elastic.workers > 0)")
    op_timeout_s: float = key(10.0, _seconds, "number > 0: with torchft, each cross-node collective "
                              "fails after this many seconds (gloo cannot abort one: a silent node costs about "
                              "this); size it from the expected bucket time")
    min_nodes: int = key(1, _int(1), "int >= 1: with torchft, the fewest live nodes a round may have; below it "
                         "the round waits up to floor_wait_s, then the run stops")
    floor_wait_s: float = key(60.0, _seconds, "number > 0: with torchft, seconds a round waits below "
                              "the floor for a node to come back before the run stops")
    quorum_timeout_s: float = key(60.0, _seconds, "number > 0: with torchft, seconds a quorum may take "
                                  "before the lighthouse counts as lost")
    deadline_margin: float = key(0.0, _non_negative, "number >= 0: 0 waits for every worker at a round; m > 0 "
                                 "closes a round at (1 + m) x the median of the workers' recent round times without "
                                 "the workers still stepping, when those on time cover the data (the trainer: "
                                 "elastic.min_coverage, elastic.min_workers); a late worker skips the rest of its "
                                 "round's steps and takes the average (node_size 1, no torchft)", "when_set")

    @property
    def live(self) -> bool:
        """A fault-tolerant run: torchft decides which nodes take part in each round."""
        return self.fault_tolerance == "torchft"

    @property
    def bucket_bytes(self) -> int:
        return max(1, int(self.bucket_mb * 1024 * 1024))

    @property
    def hierarchical(self) -> bool:
        return self.node_size > 1

    @property
    def outer(self) -> bool:
        """Whether a round ends with an outer optimizer step (else: plain averaging)."""
        return self.outer_lr != 1.0 or self.outer_momentum != 0.0

    @property
    def delay(self) -> int:
        """Steps between a round's start (its all-reduce launched) and the step its average is
        applied at, with ``overlap``."""
        return self.overlap_delay or self.tau

    def workers(self, world_size: int) -> int:
        """RI-SGD workers of ``world_size`` ranks (the :class:`~risgd_common.layout.Layout`'s)."""
        return Layout(world_size, self.node_size).workers

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


KEYS = {f.name: f for f in fields(RISGDConfig)}
_DEFAULTS = RISGDConfig()


def engine_keys_help() -> dict[str, str]:
    """Key -> its one line of help, in declaration order."""
    return {name: f.metadata["help"] for name, f in KEYS.items()}


def recipe_keys() -> dict[str, Any]:
    """The engine keys a recipe has, with their defaults (lists for tuples: YAML's type)."""
    return {name: list(getattr(_DEFAULTS, name)) if isinstance(getattr(_DEFAULTS, name), tuple)
            else getattr(_DEFAULTS, name) for name, f in KEYS.items() if f.metadata["recipe"]}


def block_from_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """The ``risgd`` block entries a recipe's engine keys write (see :func:`key`'s ``recipe``)."""
    out = {}
    for name, f in KEYS.items():
        rule = f.metadata["recipe"]
        if rule == "always" or (rule == "when_set" and values[name] != getattr(_DEFAULTS, name)):
            out[name] = values[name]
    return out


def keys_table() -> str:
    """The table of the ``risgd`` block in docs/engine.md, made from the declarations."""
    rows = ["| key | default | recipe key | what |", "|---|---|---|---|"]
    for name, f in KEYS.items():
        default = getattr(_DEFAULTS, name)
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        rows.append(f"| `{name}` | `{shown}` | {'yes' if f.metadata['recipe'] else 'no'} | {f.metadata['help']} |")
    return "\n".join(rows)


_STATIC_KEYS = {"ranks", "start_round", "end_round"}
_RANDOM_KEYS = {"count", "prob", "seed", "start_round"}


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
        start = _int(0, where)("start_round", entry.get("start_round", 0))
        end = entry.get("end_round")
        if end is not None:
            end = _int(start + 1, where)("end_round", end)
        return StaticFailure(tuple(sorted(set(ranks))), start, end)
    if "count" in entry:
        unknown = set(entry) - _RANDOM_KEYS
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}: allowed {sorted(_RANDOM_KEYS)}")
        count = _int(1, where)("count", entry.get("count", 1))
        prob = PROBABILITY.check(f"{where}.prob", entry.get("prob"), error=ConfigError)
        seed = _int(0, where)("seed", entry.get("seed", 0))
        return RandomFailure(count, prob, seed, _int(0, where)("start_round", entry.get("start_round", 0)))
    raise ConfigError(f"{where} needs either 'ranks' (fixed failures) or 'count' and 'prob' (random failures)")


def parse_block(block: Any) -> RISGDConfig:
    """Validate a ``"risgd"`` block; raise :class:`ConfigError` with a one-line message. An already
    validated :class:`RISGDConfig` is returned as it is."""
    if isinstance(block, RISGDConfig):
        return block
    if not isinstance(block, dict):
        raise ConfigError(f"the '{BLOCK}' block must be a JSON object, got {type(block).__name__}")
    unknown = sorted(set(block) - set(KEYS))
    if unknown:
        allowed = ", ".join(sorted(KEYS))
        raise ConfigError(f"unknown key(s) {unknown} in the '{BLOCK}' block: allowed keys are {allowed}")
    cfg = RISGDConfig(**{name: f.metadata["check"](name, block[name]) for name, f in KEYS.items() if name in block})
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
    if cfg.outer_nesterov and cfg.outer_momentum == 0:
        raise ConfigError(f"{BLOCK}.outer_nesterov=true needs {BLOCK}.outer_momentum > 0 (Nesterov momentum "
                          "without momentum is plain SGD): set outer_momentum, e.g. 0.9, or leave outer_nesterov out")
    block = CODECS[cfg.compress].block if cfg.compress in CODECS else 1
    if block > 1 and cfg.bucket_bytes < 4 * block:
        raise ConfigError(f"{BLOCK}.bucket_mb={cfg.bucket_mb:g} is too small for compress={cfg.compress}: a bucket "
                          f"must hold at least one block of {block} values with its scale ({4 * block} bytes); raise "
                          "bucket_mb")
    if cfg.average_optimizer_state and cfg.compress != "none":
        raise ConfigError(f"{BLOCK}.average_optimizer_state is not supported with compress={cfg.compress}: leave "
                          "one of them out")
    if cfg.average_optimizer_state and cfg.live:
        raise ConfigError(f"{BLOCK}.average_optimizer_state is not supported with fault_tolerance=torchft: leave "
                          "one of them out")
    if cfg.deadline_margin and cfg.hierarchical:
        raise ConfigError(f"{BLOCK}.deadline_margin={cfg.deadline_margin:g} is not supported with node_size > 1 yet (a "
                          "node's ranks would have to agree on being late every step): leave one of them out")
    if cfg.deadline_margin and cfg.overlap and cfg.compress != "none":
        raise ConfigError(f"{BLOCK}.deadline_margin={cfg.deadline_margin:g} is not supported with overlap and "
                          f"compress={cfg.compress} yet (the composition matrix found the ranks hang): leave one of "
                          "them out")
    if cfg.deadline_margin and cfg.live:
        raise ConfigError(f"{BLOCK}.deadline_margin={cfg.deadline_margin:g} is not supported with "
                          "fault_tolerance=torchft yet (its rounds are voted among the quorum's nodes): leave one of "
                          "them out")
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


def check_layout(node_size: int, world_size: int) -> Layout:
    """The run's :class:`~risgd_common.layout.Layout`, or one line saying why there is none."""
    try:
        return Layout(world_size, node_size)
    except LayoutError:
        raise ConfigError(f"{BLOCK}.node_size={node_size} does not divide the {world_size} ranks: set it to the "
                          "ranks per node (the launcher's --num_gpus / slots)") from None


def check_world(cfg: RISGDConfig, world_size: int) -> None:
    """Checks that need the world size (known only once the process group exists)."""
    layout = check_layout(cfg.node_size, world_size)
    if cfg.live:  # one DeepSpeed world per node: its ranks are the node; failures name nodes (checked later)
        if world_size > 1 and cfg.node_size != world_size:
            raise ConfigError(f"{BLOCK}.fault_tolerance=torchft runs one DeepSpeed world per node: set "
                              f"{BLOCK}.node_size to its {world_size} ranks (or launch one rank per node)")
        return
    unit = "ranks"
    if cfg.hierarchical:  # failures name workers (nodes), checked against their number
        world_size, unit = layout.workers, "workers (nodes)"
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


def split_config(ds_config: dict, validated: RISGDConfig | None = None) -> tuple[dict, RISGDConfig | None]:
    """Return (the config DeepSpeed sees, the validated risgd block or None). ``validated``: the
    block as already validated (by the recipe config), taken instead of parsing it again."""
    ds_config = dict(ds_config)
    block = ds_config.pop(BLOCK, None)
    if block is None and validated is None:
        return ds_config, None
    cfg = validated if validated is not None else parse_block(block)
    check_deepspeed_config(ds_config)
    return ds_config, cfg
