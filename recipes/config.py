"""Recipe YAML: schema, dotted command-line overrides, validation.

A recipe is checked completely before any work starts; every error is one line naming the key and
the fix. The schema below is the single source of truth for what a recipe may say.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

ALGORITHMS = ("sync", "prsgd", "risgd", "coop")


class RecipeError(ValueError):
    """A recipe that cannot run."""


# key -> default. The type of the default is the type required (None: any of str/number/null;
# an int default also accepts nothing but ints; a float default accepts ints).
SCHEMA: dict[str, Any] = {
    "name": "run",
    "run_name": None,              # default: NAME-ALGORITHM-tauT-muM-sSEED
    "runs_dir": "runs",
    "algorithm": "risgd",          # sync | prsgd | risgd | coop
    "tau": 50,
    "mu": 0.0,
    "warmup_sync_steps": 0,
    "average_optimizer_state": False,
    "steps": 0,                    # optimizer steps; 0: use epochs
    "epochs": 0,                   # epochs of one chunk D_j (the manifest's steps_per_epoch)
    "eval_every": 100,             # steps; a multiple of tau, so the model evaluated is the average
    "checkpoint_every": 0,         # steps; 0: only at the end
    "seed": 0,
    "dist_timeout_s": 600,         # a collective waiting longer than this fails the job (a dead rank)
    "ds_config": "ds_configs/digits.json",
    "failures": [],                # risgd.failures entries (see risgd_ext)
    "model": {"name": "resnet8_digits", "drop_rate": 0.0},
    "data": {
        "dataset": "digits",
        "shards": "shards/digits",  # made on the fly for digits when missing
        "src": None,                # source for making shards (CIFAR tarball, ImageNet root)
        "manifest": None,           # a manifest YAML; null: built from the parameters below
        "partition": "iid",
        "hetero_std": 0.0,
        "batch_policy": "per_chunk",
        "base_batch": 32,
        "eval_batch": 256,
        "num_workers": 0,
        "image_size": None,
    },
    "optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False},
    "schedule": {"kind": "cosine", "warmup_steps": 0, "milestones": [], "gamma": 0.1, "min_lr": 0.0},
    "wandb": {"enabled": True, "project": "risgd", "group": None, "mode": None},
    # For the cost model's advice in summary.json: the link bandwidth between nodes (0: estimate it
    # from this run's measured collectives) and the per-message latency.
    "network": {"bandwidth_gbit": 0.0, "latency_us": 50.0, "target_comm_share": 0.1},
}

_ANY = (str, int, float, type(None))


def _check_type(key: str, value: Any, default: Any) -> Any:
    if default is None:
        ok = isinstance(value, _ANY) and not isinstance(value, bool)
        expected = "a string, a number or null"
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a string"
    elif isinstance(default, list):
        ok, expected = isinstance(value, list), "a list"
    else:
        ok, expected = True, ""
    if not ok:
        raise RecipeError(f"recipe key '{key}' must be {expected}, got {value!r}: fix the recipe or the override")
    return value


def _merge(schema: dict, given: dict, prefix: str = "") -> dict:
    unknown = sorted(set(given) - set(schema))
    if unknown:
        where = f" in '{prefix[:-1]}'" if prefix else ""
        raise RecipeError(f"unknown recipe key(s) {[prefix + k for k in unknown]}{where}: "
                          f"allowed are {sorted(schema)}")
    out = {}
    for key, default in schema.items():
        if isinstance(default, dict):
            sub = given.get(key, {}) or {}
            if not isinstance(sub, dict):
                raise RecipeError(f"recipe key '{prefix}{key}' must be a mapping, got {sub!r}")
            out[key] = _merge(default, sub, f"{prefix}{key}.")
        elif key in given:
            out[key] = _check_type(prefix + key, given[key], default)
        else:
            out[key] = copy.deepcopy(default)
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
    if cfg["algorithm"] not in ALGORITHMS:
        raise RecipeError(f"algorithm '{cfg['algorithm']}' is unknown: use one of {', '.join(ALGORITHMS)}")
    if cfg["tau"] < 1:
        raise RecipeError(f"tau must be >= 1, got {cfg['tau']}: set tau to the local steps between averages")
    if cfg["algorithm"] in ("sync", "prsgd", "coop") and cfg["mu"] != 0:
        raise RecipeError(f"algorithm {cfg['algorithm']} uses no redundancy, but mu={cfg['mu']}: set mu=0 "
                          "or algorithm=risgd")
    if (cfg["steps"] > 0) == (cfg["epochs"] > 0):
        raise RecipeError("set exactly one of 'steps' and 'epochs' to a positive number")
    tau = 1 if cfg["algorithm"] == "sync" else cfg["tau"]
    for key in ("eval_every", "checkpoint_every"):
        if cfg[key] < 0 or cfg[key] % tau:
            raise RecipeError(f"{key}={cfg[key]} must be a multiple of tau={tau}, so that the model it sees "
                              "is the average: change one of them")
    if cfg["data"]["batch_policy"] not in ("per_chunk", "split"):
        raise RecipeError(f"data.batch_policy must be per_chunk or split, got {cfg['data']['batch_policy']!r}")
    if cfg["schedule"]["kind"] not in ("cosine", "step", "constant"):
        raise RecipeError(f"schedule.kind must be cosine, step or constant, got {cfg['schedule']['kind']!r}")
    net = cfg["network"]
    if net["bandwidth_gbit"] < 0 or net["latency_us"] < 0 or not 0 < net["target_comm_share"] < 1:
        raise RecipeError("network.bandwidth_gbit and network.latency_us must be >= 0 and "
                          "network.target_comm_share in (0, 1)")
    if cfg["data"]["base_batch"] < 1:
        raise RecipeError("data.base_batch must be >= 1")


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved recipe: defaults < YAML file < ``key=value`` overrides, validated."""
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
    for item in overrides:
        apply_override(raw, item)
    cfg = _merge(SCHEMA, raw)
    validate(cfg)
    cfg["recipe"] = os.path.relpath(path)
    return cfg


def run_name(cfg: dict) -> str:
    if cfg["run_name"]:
        return cfg["run_name"]
    tau = 1 if cfg["algorithm"] == "sync" else cfg["tau"]
    return f"{cfg['name']}-{cfg['algorithm']}-tau{tau}-mu{cfg['mu']:g}-s{cfg['seed']}"
