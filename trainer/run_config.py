"""Recipe YAML -> resolved config -> the ds_config with its ``risgd`` block: the one config path.

    run = resolve_run("recipes/digits.yaml", ["tau=25"], world_size=4)

:func:`resolve_run` builds and checks everything a run is, before any process group or data work:
the recipe (defaults < YAML < ``key=value`` overrides), the redundancy parameters (from the
manifest file when the recipe names one: it is their only source), the ds_config with its
``risgd`` block (read once, validated by the engine's own validator), that the run ends on an
average, and that an existing run directory holds this same experiment. Every error is one line
naming the key and the fix. Each key is one declaration, a field of the typed records :class:`Recipe`
(and its mappings' records) with its default and validator (:func:`rkey`); each bound a validator
checks (an int >= k, a number of seconds > 0, ...) is written once in :mod:`risgd_common.bounds`,
which the engine's block is checked with too. The engine's recipe keys, their defaults and how they
are written into the ``risgd`` block come from their one declaration in
:class:`risgd_ext.config.RISGDConfig` (``recipe_keys``, ``block_from_recipe``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, make_dataclass
from typing import Any

import yaml

from risgd_common.bounds import (
    FLAG,
    INTEGER,
    LIST,
    NON_NEGATIVE_NUMBER,
    NUMBER,
    POSITIVE_SECONDS,
    SCALAR,
    SHARE,
    STRING,
    Bound,
    at_least,
    one_of,
    within,
)
from risgd_common.layout import Layout
from risgd_data.errors import DataError
from risgd_data.gpu_decode import DECODES, check_decode
from risgd_data.index import load_index
from risgd_data.manifest import load_manifest, validate_manifest_params
from risgd_ext.config import (
    KEYS,
    ConfigError,
    RISGDConfig,
    block_from_recipe,
    check_layout,
    check_world,
    load_ds_config,
    recipe_keys,
    split_config,
)
from risgd_recipes.bundled import ds_config_candidates, ds_config_names

from .naming import legacy_run_name, run_name  # the recipe's default run name (also trainer.run_config.run_name)

ALGORITHMS = ("sync", "prsgd", "risgd", "coop")
NO_REDUNDANCY = ("sync", "prsgd", "coop")  # algorithms that run at mu=0
PRECISIONS = (None, "fp32", "bf16")
_ENGINE = RISGDConfig()  # the engine's defaults


class RecipeError(ValueError):
    """A recipe that cannot run."""


# -- the recipe's keys: typed records, one declaration per key ----------------------------------------
_FIX = "fix the recipe or the override"


@dataclass(frozen=True)
class RecipeCheck:
    """A recipe key's validator, ``(key, value) -> value``: its type (``kind``: ``recipe key 'K' must be
    an integer, ...``), then ``extra``, a check whose words are its own, then its bound (``K must be a
    number of seconds > 0, ...``). Types and bounds are risgd_common.bounds', which the engine's block checks
    with too; every refusal is one line naming the key and the fix."""

    kind: Bound
    bound: Bound | None = None
    extra: Callable[[str, Any], None] | None = None

    def __call__(self, key: str, value: Any) -> Any:
        value = self.kind.check(f"recipe key '{key}'", value, _FIX, RecipeError)  # as typed: 2 -> 2.0
        if self.extra is not None:
            self.extra(key, value)
        if self.bound is not None and not self.bound.ok(value):  # the value stays as typed (600, not 600.0)
            raise RecipeError(self.bound.message(key, value, _FIX))
        return value


def _kind_of(default: Any) -> Bound:
    """The type a default says a key has (None: any of str/number/null; a float default accepts ints)."""
    for kind, types in ((FLAG, bool), (INTEGER, int), (NUMBER, float), (STRING, str), (LIST, list)):
        if isinstance(default, types):
            return kind
    return SCALAR


def rkey(default: Any, bound: Bound | None = None, *, kind: Bound | None = None,
         extra: Callable[[str, Any], None] | None = None) -> Any:
    """One recipe key: its default and its validator (:class:`RecipeCheck`; ``kind``, by default the
    default's type), declared once."""
    meta = {"check": RecipeCheck(kind or _kind_of(default), bound, extra)}
    if isinstance(default, list):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(record: type) -> Any:
    """A mapping of keys (``data``, ``elastic``, ...): its own record."""
    return field(default_factory=record, metadata={"section": record})


def _algorithm(key: str, value: Any) -> None:
    if value not in ALGORITHMS:
        raise RecipeError(f"algorithm '{value}' is unknown: use one of {', '.join(ALGORITHMS)}")


def _every(key: str, value: Any) -> None:
    if value is not None and not at_least(0).ok(value):
        raise RecipeError(f"{key}={value} must be >= 0 (0: only at the end of the run)")


def _backend(key: str, value: Any) -> None:
    if value == "torchrun":
        raise RecipeError("elastic.backend=torchrun was retired (a lost node restarted every node from the "
                          "last checkpoint, 35-37 s): drop the key (torchft is the default) and start one launch "
                          "per node with TORCHFT_LIGHTHOUSE set (risgd-elastic or deepspeed; docs/elastic.md)")


@dataclass(frozen=True)
class ModelKeys:
    name: str = rkey("resnet8_digits")
    drop_rate: float = rkey(0.0)
    channels_last: bool = rkey(False)


@dataclass(frozen=True)
class DataKeys:
    dataset: str = rkey("digits")
    shards: str = rkey("shards/digits")    # made on the fly for digits when missing
    src: str | None = rkey(None)           # source for making shards (CIFAR tarball, ImageNet root)
    manifest: str | None = rkey(None)      # a manifest YAML; null: built from mu, partition, hetero_std, seed
    partition: str = rkey("iid")           # with data.manifest: the manifest's
    hetero_std: float = rkey(0.0)          # with data.manifest: the manifest's
    batch_policy: str = rkey("per_chunk", one_of(("per_chunk", "split"), "per_chunk or split"))
    base_batch: int = rkey(32, at_least(1))
    # the global batch the recipe was tuned for (lr, schedule); null: not stated. The trainer warns when the
    # batch policy gives one > 1.25x off it.
    global_batch: int | None = rkey(None, at_least(1).or_null(
        "null (not stated) or the positive global batch the recipe was tuned for"))
    eval_batch: int = rkey(256)
    num_workers: int = rkey(0)
    image_size: int | None = rkey(None)
    verify: str = rkey("stamp", one_of(("stamp", "full"), "stamp or full"))  # stamp: skip re-hashing
    # replicated, unchanged shards; full: hash all
    fast_decode: bool = rkey(True)         # JPEG training data: timm's transform fused with a faster decode
    # the shards' make_shards --max-side (checked against index.json); null: any
    max_side: int | None = rkey(None, at_least(1).or_null(
        "null (any shards) or the positive --max-side the shards were made with (e.g. 320)"))
    # cpu: the loader's workers decode JPEGs; gpu: the device does (nvJPEG)
    decode: str = rkey("cpu", one_of(DECODES, "cpu or gpu"))


@dataclass(frozen=True)
class OptimizerKeys:
    lr: float = rkey(0.1)
    momentum: float = rkey(0.9)
    weight_decay: float = rkey(5e-4)
    nesterov: bool = rkey(False)


@dataclass(frozen=True)
class ScheduleKeys:
    kind: str = rkey("cosine", one_of(("cosine", "step", "constant"), "cosine, step or constant"))
    warmup_steps: int = rkey(0)
    milestones: list = rkey([])
    gamma: float = rkey(0.1)
    min_lr: float = rkey(0.0)


@dataclass(frozen=True)
class WandbKeys:
    enabled: bool = rkey(True)
    project: str = rkey("risgd")
    group: str | None = rkey(None)
    mode: str | None = rkey(None)


@dataclass(frozen=True)
class NetworkKeys:
    """For the cost model's advice in summary.json: the link bandwidth between nodes (0: estimate it from
    this run's measured collectives) and the per-message latency."""

    bandwidth_gbit: float = rkey(0.0, NON_NEGATIVE_NUMBER)
    latency_us: float = rkey(50.0, NON_NEGATIVE_NUMBER)
    target_comm_share: float = rkey(0.1, SHARE)


@dataclass(frozen=True)
class ElasticKeys:
    """An elastic run: the manifest has ``workers`` workers; each node is one launch (its ranks are the node
    level) serving the manifest worker its replica records (data.shards, or the RISGD_REPLICA_DIR variable).
    Its nodes meet in torchft's quorum at every round: a lost node is dropped and a returning one healed from
    a live peer, nobody restarted (docs/elastic.md). Below min_workers live nodes, or below min_coverage of
    the training set, a round waits floor_wait_s for a node, then every node stops (exit 2); op_timeout_s:
    each cross-node operation's timeout; quorum_timeout_s: how long a round waits for the lighthouse's
    quorum (a lost lighthouse is noticed after it: every node checkpoints and stops). backend: torchft, the
    only one (torchrun is refused in one line naming the way over)."""

    workers: int = rkey(0, at_least(0).saying("0: a fixed-size run"))
    min_workers: int = rkey(1, at_least(1))
    min_coverage: float = rkey(1.0, within(0, 1, "[]"))
    backend: str = rkey("torchft", one_of(("torchft",), "torchft"), extra=_backend)
    floor_wait_s: float = rkey(60.0, POSITIVE_SECONDS)
    op_timeout_s: float = rkey(10.0, POSITIVE_SECONDS)
    quorum_timeout_s: float = rkey(60.0, POSITIVE_SECONDS)


@dataclass(frozen=True)
class _RunKeys:
    name: str = rkey("run")
    run_name: str | None = rkey(None)      # default: NAME-ALGORITHM-tauT[-elasticP]...-muM-sSEED (trainer/naming.py)
    runs_dir: str = rkey("runs")
    algorithm: str = rkey("risgd", extra=_algorithm)  # sync | prsgd | risgd | coop


# The engine's recipe keys (tau, warmup_sync_steps, average_optimizer_state, failures, node_size, tau_intra,
# overlap, ...): their defaults from their one declaration in risgd_ext.config.RISGDConfig, their values
# checked by the engine's validator (build_ds_config), their type here.
_EngineKeys = make_dataclass("_EngineKeys", [(name, KEYS[name].type, rkey(default))
                                             for name, default in recipe_keys().items()],
                             bases=(_RunKeys,), frozen=True)


@dataclass(frozen=True)
class Recipe(_EngineKeys):
    """A recipe's keys, each declared once with its default and validator (:func:`rkey`); a mapping of
    keys is its own record (:func:`section`). A resolved recipe is a dict of these keys (and ``recipe``,
    the file it came from): what config.yaml holds."""

    mu: float = rkey(0.0)                  # with data.manifest: the manifest's mu (it is the source)
    steps: int = rkey(0)                   # optimizer steps; 0: use epochs. Must end on an average.
    epochs: int = rkey(0)                  # epochs of one chunk D_j (rounded up to the next average)
    eval_every: int = rkey(100, extra=_every)  # steps; evaluated at the first average at or after each multiple
    # steps (any step: a checkpoint may fall inside a round); null: every eval_every steps (an interrupted run
    # resumes near where it stopped); 0: none but the end
    checkpoint_every: int | None = rkey(None, kind=INTEGER.or_null(), extra=_every)
    seed: int = rkey(0)
    dist_timeout_s: int = rkey(600, POSITIVE_SECONDS)  # a collective waiting longer than this fails the job
    ds_config: str = rkey("ds_configs/digits.json")
    # fp32 | bf16 (torch autocast, fp32 weights); null: as the ds_config says
    precision: str | None = rkey(None, Bound("fp32 or bf16 (or null: as the ds_config says)",
                                             lambda v: v in PRECISIONS))
    model: ModelKeys = section(ModelKeys)
    data: DataKeys = section(DataKeys)
    optimizer: OptimizerKeys = section(OptimizerKeys)
    schedule: ScheduleKeys = section(ScheduleKeys)
    wandb: WandbKeys = section(WandbKeys)
    network: NetworkKeys = section(NetworkKeys)
    elastic: ElasticKeys = section(ElasticKeys)


def _defaults(record: type) -> dict[str, Any]:
    return {f.name: _defaults(f.metadata["section"]) if "section" in f.metadata
            else copy.deepcopy(getattr(record(), f.name)) for f in fields(record)}


def declared_keys(record: type = Recipe, prefix: str = "") -> dict[str, Field]:
    """Every recipe key (``data.partition``) -> its one declaration, in order."""
    out: dict[str, Field] = {}
    for f in fields(record):
        if "section" in f.metadata:
            out.update(declared_keys(f.metadata["section"], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f
    return out


# key -> default (a mapping of keys: a dict of its keys' defaults), made from the records.
SCHEMA: dict[str, Any] = _defaults(Recipe)


# Keys that may change when a run is continued: where things are, how they are logged, how often
# they are looked at. Every other key defines the experiment.
OPERATIONAL = ("recipe", "runs_dir", "run_name", "dist_timeout_s", "eval_every", "checkpoint_every", "wandb",
               "network", "data.shards", "data.src", "data.manifest", "data.num_workers", "data.eval_batch",
               "data.verify", "data.global_batch", "elastic.min_workers", "elastic.min_coverage",
               "elastic.floor_wait_s", "elastic.op_timeout_s", "elastic.quorum_timeout_s", "elastic.backend")
# elastic.backend: how nodes meet, not what is trained (and runs saved before torchft was the only backend say
# torchrun there, elastic or not)
# The node level, overlap, the outer step and compression: written into the 'risgd' block only when set (a
# flat run's block is unchanged by keys added after it).
NODE_KEYS = tuple(k for k, f in KEYS.items() if f.metadata["recipe"] == "when_set")
# What a manifest file decides (recipe key -> manifest key).
FROM_MANIFEST = {"mu": "mu", "data.partition": "partition", "data.hetero_std": "hetero_std"}


def _merge(record: type, given: dict, prefix: str = "") -> dict:
    """``given`` (a recipe's mapping, overrides applied) checked key by key against ``record``'s
    declarations, with the defaults of the keys it lacks: the resolved recipe, a dict."""
    declared = fields(record)
    unknown = sorted(set(given) - {f.name for f in declared})
    if unknown:
        where = f" in '{prefix[:-1]}'" if prefix else ""
        raise RecipeError(f"unknown recipe key(s) {[prefix + k for k in unknown]}{where}: "
                          f"allowed are {sorted(f.name for f in declared)}")
    defaults = record()
    out = {}
    for f in declared:
        key = f.name
        if "section" in f.metadata:
            sub = given.get(key, {}) or {}
            if not isinstance(sub, dict):
                raise RecipeError(f"recipe key '{prefix}{key}' must be a mapping, got {sub!r}")
            out[key] = _merge(f.metadata["section"], sub, f"{prefix}{key}.")
        elif key in given:
            out[key] = f.metadata["check"](prefix + key, given[key])
        else:
            out[key] = copy.deepcopy(getattr(defaults, key))
    return out


def apply_override(raw: dict, item: str) -> None:
    """``a.b=value``: value parsed as YAML (so 0.5 is a number, true a bool, [1,2] a list)."""
    if "=" not in item:
        raise RecipeError(f"override '{item}' must look like key=value (e.g. tau=50 or data.partition=iid)")
    key, text = item.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override '{item}': '{part}' is not a mapping")
    node[parts[-1]] = yaml.safe_load(text)


def validate(cfg: dict) -> None:
    """Checks of the recipe alone (no world size, no files) that involve more than one key: each key's
    own type and bound were checked by its declaration (:class:`Recipe`) as it was read. The engine's
    keys are checked by the engine's validator in :func:`build_ds_config`, the redundancy keys by the
    data package's."""
    set_keys = [k for k in NODE_KEYS if cfg[k] != getattr(_ENGINE, k)]
    if cfg["algorithm"] == "sync" and cfg["failures"]:
        set_keys.append("failures")
    if cfg["algorithm"] == "sync" and set_keys:
        raise RecipeError(f"algorithm sync all-reduces gradients over every rank every step: {', '.join(set_keys)} "
                          "apply to rounds of local-SGD algorithms (prsgd, risgd, coop): leave them out")
    if cfg["algorithm"] in NO_REDUNDANCY and cfg["mu"] != 0:
        raise RecipeError(f"algorithm {cfg['algorithm']} uses no redundancy, but mu={cfg['mu']:g}: set mu=0 "
                          "or algorithm=risgd")
    if (cfg["steps"] > 0) == (cfg["epochs"] > 0):
        given = ", ".join(f"{k}={cfg[k]}" for k in ("steps", "epochs") if cfg[k] > 0) or "neither"
        raise RecipeError(f"set exactly one of 'steps' and 'epochs' to a positive number (this run has {given}; "
                          "a recipe's value is cleared with the override steps=0 or epochs=0, e.g. "
                          "'steps=8 epochs=0')")
    data = cfg["data"]
    if data["decode"] == "gpu" and (data["dataset"] not in ("imagenet", "imagefolder") or not data["fast_decode"]):
        raise RecipeError(f"data.decode=gpu decodes JPEG training data with the fast ImageNet path (datasets imagenet, "
                          f"imagefolder with data.fast_decode=true); dataset {data['dataset']} with "
                          f"fast_decode={data['fast_decode']}: set data.decode=cpu")
    el = cfg["elastic"]
    if el["workers"] and el["min_workers"] > el["workers"]:
        raise RecipeError(f"elastic.min_workers={el['min_workers']} exceeds elastic.workers={el['workers']}: "
                          "lower it")


def _read_file(path: str) -> dict:
    """The recipe file's own mapping (no defaults, no overrides)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} not found: pass --recipe recipes/NAME.yaml") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of keys")
    raw.pop("recipe", None)  # a saved config.yaml can be run again as a recipe
    return raw


def _read_raw(path: str, overrides: list[str] | tuple[str, ...], file: dict | None = None) -> dict:
    """The recipe file's mapping (``file``: as read already) with the overrides applied."""
    raw = _read_file(path) if file is None else copy.deepcopy(file)
    for item in overrides:
        apply_override(raw, item)
    return raw


class Origins:
    """Where a recipe key's value was written, to name it in a message as the user wrote it: the
    override on the command line (``the override mu=2``), the recipe file (``mu: 0.25 in
    recipes/cifar10_resnet44.yaml``) or the schema's default (``mu=0.0, the default``)."""

    def __init__(self, path: str, overrides: list[str] | tuple[str, ...], file: dict):
        rel = os.path.relpath(path)
        self.path = os.path.abspath(path) if rel.startswith("..") else rel  # a bundled recipe: where it is
        self.overrides = list(overrides)
        self.file = file  # the recipe file's own mapping (_read_file)

    def override(self, key: str) -> str | None:
        """The last override that sets ``key`` (the one that wins), or None."""
        for item in reversed(self.overrides):
            if item.split("=", 1)[0].strip() == key:
                return item
        return None

    def typed(self, key: str) -> bool:
        """Whether the user typed ``key`` on the command line."""
        return self.override(key) is not None

    def spell(self, key: str, value: Any) -> str:
        item = self.override(key)
        if item is not None:
            return f"the override {item}"
        if _given(self.file, key):
            return f"{key}: {value} in {self.path}"
        return f"{key}={value} (the default)"


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The recipe alone: defaults < YAML file < ``key=value`` overrides, checked by :func:`validate`."""
    cfg = _merge(Recipe, _read_raw(path, overrides))
    validate(cfg)
    cfg["recipe"] = os.path.relpath(path)
    return cfg


# -- the resolved run ------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a launch is, resolved and checked before any process group or data work."""

    cfg: dict                     # the resolved recipe: saved as config.yaml
    ds_config: dict               # what risgd_ext.initialize gets: saved as ds_config.json
    risgd: RISGDConfig | None  # the validated risgd block (None: SyncSGD, plain DeepSpeed)
    manifest: dict | None         # the recipe's manifest file, loaded (None: built at start)
    world_size: int
    name: str
    run_dir: str
    finished: bool                # the run directory holds this experiment, finished
    origins: Origins | None = None  # where each key was written (for messages in the user's words)
    notes: list[str] = field(default_factory=list)  # one line each, said once at the start (rank 0)

    def is_average_step(self, step: int) -> bool:
        return self.risgd is None or self.risgd.is_average_step(step)

    @property
    def elastic(self) -> bool:
        """An elastic run (``elastic.workers`` > 0): this launch is one node of a run on torchft, whose
        nodes come and go without restarting the others."""
        return self.cfg["elastic"]["workers"] > 0

    @property
    def live(self) -> bool:
        """The same as :attr:`elastic` (torchft is the only elastic backend)."""
        return self.elastic

    @property
    def manifest_workers(self) -> int:
        """The manifest's workers: ``elastic.workers`` in an elastic run, else one per worker of the layout."""
        return self.cfg["elastic"]["workers"] or self.workers

    @property
    def layout(self) -> Layout:
        """Which ranks make up which worker (a flat run: one-rank workers)."""
        return Layout(self.world_size, self.risgd.node_size if self.risgd is not None else 1)

    @property
    def node_size(self) -> int:
        """Ranks per node: the ranks of one RI-SGD worker (1: every rank is a worker)."""
        return self.layout.node_size

    @property
    def workers(self) -> int:
        """RI-SGD workers: the manifest's --workers."""
        return self.layout.workers

    def worker_of(self, rank: int) -> tuple[int, int]:
        """(the worker a rank belongs to, its index among the worker's ranks)."""
        return self.layout.worker_of(rank), self.layout.local_of(rank)

    def worker_batch(self) -> int:
        """The base batch one worker draws per chunk: its ranks' together."""
        return self.cfg["data"]["base_batch"] * self.node_size

    def total_steps(self, steps_per_epoch: int) -> int:
        """``steps``, or ``epochs`` of the manifest's chunk rounded up to the next average; refused
        when the warm-up covers them all (see :func:`check_local_steps`)."""
        if self.cfg["steps"]:
            steps = self.cfg["steps"]
        else:
            steps = self.cfg["epochs"] * steps_per_epoch
            steps = steps if self.risgd is None else self.risgd.average_steps_near(steps)[1]
        check_local_steps(self.cfg, self.risgd, steps)
        return steps


def check_local_steps(cfg: dict, risgd: RISGDConfig | None, steps: int) -> None:
    """A local-SGD run whose synchronous warm-up covers every step would train SyncSGD under the
    name and label of another algorithm: refused."""
    if risgd is not None and risgd.warmup_sync_steps >= steps:
        raise RecipeError(f"warmup_sync_steps={risgd.warmup_sync_steps} covers all {steps} steps of this run, so "
                          f"it would never take a local step although it is named {cfg['algorithm']}: lower "
                          f"warmup_sync_steps below the run's steps (e.g. warmup_sync_steps=0 for a short trial) or "
                          "use algorithm=sync")


def _get(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _set(cfg: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[last] = value


def _given(raw: dict, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _apply_manifest(cfg: dict, raw: dict, manifest: dict, path: str) -> None:
    """The manifest decides mu, partition and hetero_std; the recipe may repeat them, not contradict."""
    mode = manifest.get("mode", "risgd")
    if (cfg["algorithm"] == "coop") != (mode == "coop"):
        raise RecipeError(f"algorithm {cfg['algorithm']} cannot use the {mode}-mode manifest {path}: build one "
                          f"with --mode {'coop' if cfg['algorithm'] == 'coop' else 'risgd'}")
    if mode == "coop":
        return  # every rank samples the whole set: mu and the partition do not apply
    clash = []
    for key, mkey in FROM_MANIFEST.items():
        value = manifest[mkey]
        if _given(raw, key) and _get(cfg, key) != value:
            clash.append(f"{key}={_get(cfg, key)!r} (manifest: {value!r})")
        _set(cfg, key, value)
    if clash:
        raise RecipeError(f"recipe key(s) {', '.join(clash)} contradict the manifest {path}, which decides them: "
                          "drop these keys or build a manifest with those values")


def check_world_size(manifest: dict, world_size: int, path: str = "the manifest", node_size: int = 1) -> None:
    workers = Layout(world_size, node_size).workers
    if manifest["workers"] != workers:
        what = (f"{world_size} ranks" if node_size == 1
                else f"{workers} workers ({world_size} ranks, node_size={node_size})")
        hint = ""
        k = world_size // manifest["workers"] if manifest["workers"] else 0
        if k > 1 and world_size % manifest["workers"] == 0 and k != node_size:
            hint = f", or run it node-level with node_size={k} (each worker a node of {k} ranks)"
        raise RecipeError(f"{path} is for {manifest['workers']} workers but this run has {what}: launch with that "
                          f"many {'ranks' if node_size == 1 else 'nodes'}{hint}, or rebuild the manifest with "
                          f"--workers {workers}")


def check_elastic(cfg: dict, world_size: int) -> None:
    """What an elastic run needs: local SGD (prsgd or risgd), and a launch that is one node (its ranks,
    ``world_size``, are the node level, so ``node_size`` is 1 or all of them)."""
    if not cfg["elastic"]["workers"]:
        return
    if cfg["algorithm"] not in ("prsgd", "risgd"):
        raise RecipeError(f"an elastic run needs algorithm prsgd or risgd, got {cfg['algorithm']!r}: change it "
                          "or set elastic.workers=0")
    if cfg["node_size"] not in (1, world_size):
        raise RecipeError(f"an elastic run's launch is one node: node_size={cfg['node_size']} must be its "
                          f"{world_size} ranks (or 1)")


def find_ds_config(path: str, recipe: str | None) -> str:
    """The file a recipe's ``ds_config`` names: as given (relative to the working directory), else
    relative to the recipe's directory or the one above it, else a bundled one (see
    :func:`risgd_recipes.bundled.ds_config_candidates`). The recipe keeps the value as written."""
    tried = ds_config_candidates(path, recipe)
    found = next((p for p in tried if os.path.isfile(p)), None)
    if found is None:
        raise RecipeError(f"ds_config {path} not found (looked for {', '.join(tried)}): set ds_config= to a JSON "
                          f"file, e.g. a bundled one: {', '.join(ds_config_names()) or 'none is installed'}")
    return found


def build_ds_config(cfg: dict, world_size: int, recipe: str | None = None) -> tuple[dict, RISGDConfig | None]:
    """The recipe's ds_config file (read once; found by :func:`find_ds_config` from ``recipe``, the
    recipe file, by default ``cfg['recipe']``) with the batch sizes and, except for SyncSGD, the
    ``risgd`` block filled from the recipe; validated by the engine's validator."""
    path = find_ds_config(cfg["ds_config"], recipe or cfg.get("recipe"))
    ds = load_ds_config(path)  # the engine's reader: ConfigError (one line) on invalid JSON
    gas = ds.get("gradient_accumulation_steps", 1)
    # DeepSpeed's batch bookkeeping; the real per-rank batch is the loader's (it grows with q).
    ds["train_micro_batch_size_per_gpu"] = cfg["data"]["base_batch"]
    ds["train_batch_size"] = cfg["data"]["base_batch"] * gas * world_size
    if cfg["precision"] == "bf16":  # fp32 weights, bf16 compute: the precision the 'risgd' block allows
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif cfg["precision"] == "fp32":
        ds.pop("torch_autocast", None)
    block = ds.pop("risgd", {})
    if cfg["algorithm"] != "sync":
        block.update(block_from_recipe(cfg))
        el = cfg["elastic"]
        if el["workers"]:
            block.update(fault_tolerance="torchft", min_nodes=el["min_workers"], floor_wait_s=float(el["floor_wait_s"]),
                         op_timeout_s=float(el["op_timeout_s"]), quorum_timeout_s=float(el["quorum_timeout_s"]))
        ds["risgd"] = block
    _, risgd = split_config(ds)
    if risgd is not None:
        check_world(risgd, world_size)
    return ds, risgd


def _flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and (prefix + key) in _NESTED:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


_NESTED = {k for k, v in SCHEMA.items() if isinstance(v, dict)}


def experiment_keys(cfg: dict, ignore: tuple[str, ...] = ()) -> dict:
    """A resolved config's experiment-defining keys, flattened (``data.partition``), with the schema's
    defaults for keys it lacks (a config saved before a key existed): every key but the OPERATIONAL
    ones and those in ``ignore`` (e.g. ``("seed",)``: the keys that make runs seeds of one experiment)."""
    flat = dict(_flatten(SCHEMA), **_flatten(cfg))
    skip = OPERATIONAL + tuple(ignore)
    return {k: v for k, v in sorted(flat.items()) if not any(k == o or k.startswith(o + ".") for o in skip)}


def experiment_diff(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The experiment-defining keys in which two resolved configs differ (``key: old -> new``)."""
    a, b = experiment_keys(old, ignore), experiment_keys(new, ignore)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_same_experiment(run_dir: str, cfg: dict) -> bool:
    """Refuse to continue (or rewrite) a run directory that holds another experiment.

    Returns whether the run there is finished (it has a summary.json).
    """
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            old = yaml.safe_load(f)
    except yaml.YAMLError:
        old = None
    if not isinstance(old, dict):
        raise RecipeError(f"{path} is not a run's config: move the run directory away or pick another run_name=")
    diff = experiment_diff(old, cfg)
    if diff:
        raise RecipeError(f"{run_dir} holds another experiment ({'; '.join(diff)}): it is never continued or "
                          "rewritten under a changed configuration; pick a new run_name= or runs_dir=")
    return os.path.exists(os.path.join(run_dir, "summary.json"))


def check_same_manifest(run_dir: str, manifest: dict) -> None:
    """The manifest a continued run trains on must be the one it started with."""
    path = os.path.join(run_dir, "manifest.yaml")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = yaml.safe_load(f)
    if old != yaml.safe_load(yaml.safe_dump(manifest)):  # compare as written (lists, not tuples)
        raise RecipeError(f"{run_dir} was trained on another redundancy manifest ({path} differs from this "
                          "run's: other shards or another manifest file); pick a new run_name= or runs_dir=")


def check_max_side(data: dict) -> None:
    """``data.max_side`` (not null) must be what the shards' index.json records (make_shards
    --max-side); read before any process group or data work, like the manifest."""
    want = data["max_side"]
    if want is None:
        return
    path = os.path.join(data["shards"], "index.json")
    remake = (f"python -m data.make_shards --dataset {data['dataset']} --src SRC --out {data['shards']} "
              f"--max-side {want}")
    if not os.path.exists(path):
        raise RecipeError(f"data.max_side={want} but {path} does not exist (shards made at start are full size): "
                          f"make them first with {remake}, or set data.max_side=null")
    try:
        index = load_index(data["shards"])
    except DataError as e:
        raise RecipeError(str(e)) from None
    have = index.get("max_side")
    if have != want:
        what = "full-size images (made without --max-side)" if have is None else f"max_side {have}"
        raise RecipeError(f"data.max_side={want} but {path} records {what}: set data.max_side="
                          f"{'null' if have is None else have} to train on these shards, or remake them with "
                          f"{remake}")


def _recipe_spelling(origins: Origins, cfg: dict, world_size: int, node_size: int):
    """The redundancy validator's parameters (risgd_data.manifest.validate_manifest_params) named as
    the trainer's user wrote them: recipe keys and where they were set, the launch's workers."""
    keys = {"mu": "mu", "partition": "data.partition", "hetero_std": "data.hetero_std"}

    def spell(param: str, value: Any) -> str:
        if param == "workers":
            if cfg["elastic"]["workers"]:
                return f"p={value} workers ({origins.spell('elastic.workers', value)})"
            ranks = f"this launch's {world_size} rank{'s' if world_size != 1 else ''}"
            ranks += f" in nodes of node_size={node_size}" if node_size > 1 else ""
            return f"p={value} worker{'s' if value != 1 else ''} ({ranks}): lower mu or launch more ranks"
        if param in keys:
            return origins.spell(keys[param], value)
        return f"{param}={value}"

    return spell


# Datasets whose shards the trainer makes at start from data.src, and the kind of path data.src is.
SOURCE_KINDS = {"cifar10": "file", "cifar100": "file", "imagefolder": "directory", "imagenet": "directory"}


def check_shards_source(data: dict, origins: Origins) -> None:
    """Where the shards come from, checked by the trainer before any process group (not by
    :func:`resolve_run`, which plans runs on machines without their data): a ``data.shards`` without
    index.json is where the trainer makes them at start (digits: embedded; else from ``data.src``).
    A path typed on the command line whose parent does not exist is refused (a typo would otherwise
    be created, parents and all, and trained on); the recipe's own path is made with its parents
    (the bundled ``shards/digits`` on a fresh clone). A missing or wrong ``data.src`` is named as
    the recipe key it is, not as the make_shards flag behind it."""
    shards = data["shards"]
    if os.path.exists(os.path.join(shards, "index.json")):
        return
    where = origins.spell("data.shards", shards)
    if os.path.exists(shards) and not os.path.isdir(shards):
        raise RecipeError(f"{where} is a file, not a shard directory: point data.shards at a directory of shards "
                          "(one with index.json)")
    parent = os.path.dirname(shards.rstrip("/") or shards) or "."  # as typed: an absolute path stays absolute
    if origins.typed("data.shards") and not os.path.isdir(parent):
        raise RecipeError(f"{where}: no shards there and its parent {parent} does not exist: fix "
                          f"the path to a directory of shards (one with index.json), or create "
                          f"{parent} first to have the shards made there at start")
    kind = SOURCE_KINDS.get(data["dataset"])
    if kind is None:  # digits: embedded, made from nothing
        return
    src = data["src"]
    ok = src is not None and (os.path.isfile(src) if kind == "file" else os.path.isdir(src))
    if not ok:
        what = "is not set" if src is None else f"is not a {kind}"
        src_words = "data.src" if src is None else origins.spell("data.src", src)
        raise RecipeError(f"{where} holds no shards (no index.json there), and {src_words}, from which they would "
                          f"be made at start, {what}: point data.shards at shards made by make_shards, or set "
                          f"data.src to the {data['dataset']} source ({SOURCE_HINTS[data['dataset']]})")


SOURCE_HINTS = {"cifar10": "the official cifar-10-python.tar.gz", "cifar100": "the official cifar-100-python.tar.gz",
                "imagefolder": "a root of CLASS/IMAGE directories", "imagenet": "the ILSVRC-2012 root with train/ "
                "and val/"}


def _legacy_run_dir(cfg: dict, name: str) -> str | None:
    """An elastic run started under its old default name (before ``-elasticP``): its directory, where this
    command's own directory does not exist and that one holds this same experiment (a fixed run of the same
    keys there is another experiment: not this run's); else None."""
    old = legacy_run_name(cfg)
    if old is None or os.path.exists(os.path.join(cfg["runs_dir"], name)):
        return None
    run_dir = os.path.join(cfg["runs_dir"], old)
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return run_dir if isinstance(saved, dict) and not experiment_diff(saved, cfg) else None


def resolve_run(path: str, overrides: list[str] | tuple[str, ...], world_size: int) -> Run:
    """The whole launch, resolved and checked (see the module docstring)."""
    origins = Origins(path, overrides, _read_file(path))
    raw = _read_raw(path, overrides, origins.file)
    cfg = _merge(Recipe, raw)
    notes = []
    if (cfg["algorithm"] in NO_REDUNDANCY and cfg["mu"] != 0 and not origins.typed("mu")
            and not cfg["data"]["manifest"]):
        # the recipe's mu is RI-SGD's: an algorithm without redundancy runs at mu=0 (a typed mu= is refused)
        notes.append(f"note: algorithm {cfg['algorithm']} uses no redundancy: mu=0 ({origins.spell('mu', cfg['mu'])} "
                     "is for risgd)")
        cfg["mu"] = 0.0
    manifest = None
    node_size = cfg["node_size"]
    try:  # the workers (the manifest's) need the node level first: the engine's validator of it
        workers = check_layout(KEYS["node_size"].metadata["check"]("node_size", node_size), world_size).workers
    except ConfigError as e:
        raise RecipeError(str(e)) from None
    if isinstance(cfg["elastic"]["workers"], int) and cfg["elastic"]["workers"] > 0:
        validate(cfg)
        check_elastic(cfg, world_size)
        workers = cfg["elastic"]["workers"]  # the manifest's, whatever the launch's world size
        node_size = cfg["node_size"] = world_size  # the launch is one node
    try:
        if cfg["data"]["manifest"]:
            manifest = load_manifest(cfg["data"]["manifest"])
            check_world_size(manifest, workers * node_size, f"the manifest {cfg['data']['manifest']}", node_size)
            _apply_manifest(cfg, raw, manifest, cfg["data"]["manifest"])
        validate(cfg)
        check_max_side(cfg["data"])
        check_decode(cfg["data"]["decode"])  # gpu without CUDA: one line, before any process group
        if manifest is None:
            mode = "coop" if cfg["algorithm"] == "coop" else "risgd"
            validate_manifest_params(workers, cfg["mu"], cfg["data"]["partition"], cfg["data"]["hetero_std"],
                                     mode, spell=_recipe_spelling(origins, cfg, world_size, node_size))
    except DataError as e:
        raise RecipeError(str(e)) from None
    try:
        ds_config, risgd = build_ds_config(cfg, world_size, recipe=path)
    except ConfigError as e:
        raise RecipeError(str(e)) from None
    cfg["recipe"] = os.path.relpath(path)
    if cfg["checkpoint_every"] is None:  # by default at every evaluation: Ctrl-C loses at most eval_every steps
        cfg["checkpoint_every"] = cfg["eval_every"]
    name = run_name(cfg)
    legacy = _legacy_run_dir(cfg, name)
    if legacy is not None:
        notes.append(f"note: continuing {legacy}, this run's directory under its name from before elastic runs were "
                     f"named -elastic{cfg['elastic']['workers']} (a new elastic run is named {name})")
        name = os.path.basename(legacy)
    run = Run(cfg, ds_config, risgd, manifest, world_size, name, os.path.join(cfg["runs_dir"], name), finished=False)
    steps = cfg["steps"]
    if steps:
        check_local_steps(cfg, risgd, steps)
    if steps and not run.is_average_step(steps):
        below, above = risgd.average_steps_near(steps)
        raise RecipeError(f"steps={steps} ends inside a round (warmup_sync_steps={risgd.warmup_sync_steps}, "
                          f"tau={risgd.tau}): the final model would not be an average; use steps={below} or "
                          f"steps={above}")
    run.origins, run.notes = origins, notes
    run.finished = check_same_experiment(run.run_dir, cfg)
    return run
