"""Run names and run labels, built in one place.

Every run name has one shape, ``HEAD-ALGORITHM[-TAG...]-sSEED``; what differs is the head and the
tags, in three forms that name runs already on disk (so each stays as it was):

- :func:`run_name`: a recipe's default (train.py), from the resolved configuration (a value typed
  on the command line names a run as the same value left to the recipe or the default does):
  ``NAME-ALGORITHM-tauT[-elasticP][-nodeN][-tiK][-ov[D]][-olrLmM[n]][-int8|-bf16[-noef]][-dlM]-muM-sSEED``
  (``elasticP``: an elastic run of P workers; :func:`legacy_run_name` its name before that tag);
- :func:`setting_run_name`: a paper-grid setting's:
  ``PART-ALGORITHM[-tT][-muM[-hH]]-bB[-POLICY][-downR..rF][-nodeN]-sSEED``;
- :func:`demo_run_name`: the demo's short form: ``NAME-ALGORITHM[-muM]-sSEED``.

A label is what a table or a plot calls a run: ``SyncSGD``, ``PR-SGD tau=50``, ``RI-SGD tau=50 mu=0.25``
(:func:`label`).

This module imports nothing of the recipes (trainer.run_config imports it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

ALGORITHM_NAMES = {"sync": "SyncSGD", "prsgd": "PR-SGD", "risgd": "RI-SGD", "coop": "Coop-SGD"}
PARTITION_TAGS = {"label_sorted": "ls", "iid": "iid"}


def _name(head: str, algorithm: str, tags: Iterable[str], seed: int) -> str:
    """The one shape of a run name: HEAD-ALGORITHM[-TAG...]-sSEED."""
    return "-".join([head, algorithm, *tags, f"s{seed}"])


def _mu(mu: float) -> str:
    return f"mu{mu:g}"


def run_name(cfg: dict) -> str:
    """A resolved recipe's run name: its ``run_name`` key, else NAME-ALGORITHM-tauT...-muM-sSEED from the
    resolved values (tau 1 for SyncSGD; an elastic run's workers, the node level and overlap tagged only
    when set), whether each was typed, written in the recipe or left to its default."""
    if cfg["run_name"]:
        return cfg["run_name"]
    return _default_name(cfg, elastic=True)


def legacy_run_name(cfg: dict) -> str | None:
    """An elastic run's default name as it was before elastic runs were tagged ``-elasticP`` (the name a
    fixed run of the same keys has), to find a run directory started under it; None for any other run."""
    if cfg["run_name"] or not cfg.get("elastic", {}).get("workers"):
        return None
    return _default_name(cfg, elastic=False)


def _default_name(cfg: dict, elastic: bool) -> str:
    tags = [f"tau{1 if cfg['algorithm'] == 'sync' else cfg['tau']}"]
    if elastic and cfg.get("elastic", {}).get("workers"):
        tags.append(f"elastic{cfg['elastic']['workers']}")
    if cfg["node_size"] > 1:
        tags.append(f"node{cfg['node_size']}")
    if cfg["tau_intra"]:
        tags.append(f"ti{cfg['tau_intra']}")
    if cfg["overlap"]:
        tags.append("ov" + (str(cfg["overlap_delay"]) if cfg["overlap_delay"] else ""))
    if cfg.get("outer_lr", 1.0) != 1.0 or cfg.get("outer_momentum", 0.0) != 0.0:
        tags.append(f"olr{cfg['outer_lr']:g}m{cfg['outer_momentum']:g}" + ("n" if cfg.get("outer_nesterov") else ""))
    if cfg.get("compress", "none") != "none":
        tags.append(cfg["compress"] + ("" if cfg.get("error_feedback", True) else "-noef"))
    if cfg.get("deadline_margin", 0.0):
        tags.append(f"dl{cfg['deadline_margin']:g}")
    tags.append(_mu(cfg["mu"]))
    return _name(cfg["name"], cfg["algorithm"], tags, cfg["seed"])


def setting_run_name(setting: Any, seed: int) -> str:
    """A paper-grid setting's run name (``setting``: a :class:`tools.paper.grid.Setting`): a pure
    function of the setting and the seed, so experiments that share a setting share its runs."""
    s = setting
    tags = [] if s.algorithm == "sync" else [f"t{s.tau}"]
    if s.algorithm == "risgd":
        tags.append(_mu(s.mu))
        if s.hetero_std:
            tags.append(f"h{s.hetero_std:g}")
    tags.append(f"b{s.base_batch}")
    if s.batch_policy != "per_chunk":
        tags.append(s.batch_policy)
    if s.down:
        tags.append(f"down{'-'.join(map(str, s.down))}r{s.fail_round}")
    if getattr(s, "node_size", 1) > 1:
        tags.append(f"node{s.node_size}")
    if getattr(s, "ranks", 0):  # trained in a launch of its own world size, not the grid's
        tags.append(f"r{s.ranks}")
    head = PARTITION_TAGS.get(s.partition, s.partition.replace(":", ""))
    return _name(head, s.algorithm, tags, seed)


def demo_run_name(name: str, algorithm: str, mu: float, seed: int) -> str:
    """The demo's short form: the recipe's ``name``, the algorithm, mu for RI-SGD only, the seed."""
    return _name(name, algorithm, [_mu(mu)] if algorithm == "risgd" else [], seed)


def label(algorithm: str, tau: int | None = None, mu: float = 0.0, batch_policy: str = "per_chunk",
          mu_first: bool = False) -> str:
    """``SyncSGD``, ``PR-SGD tau=T``, ``Coop-SGD tau=T``, ``RI-SGD tau=T mu=M`` (and `` (split)`` for a
    batch policy other than per_chunk). ``tau=None`` leaves tau out (``RI-SGD mu=M``); ``mu_first`` puts
    mu before tau, as the paper report's settings do (``RI-SGD mu=M tau=T``)."""
    text = ALGORITHM_NAMES[algorithm]
    if algorithm == "sync":
        return text
    parts = [] if tau is None else [f"tau={tau}"]
    if algorithm == "risgd":
        parts.insert(0 if mu_first else len(parts), f"mu={mu:g}")
    text = " ".join([text, *parts])
    if algorithm == "risgd" and batch_policy != "per_chunk":
        text += f" ({batch_policy})"
    return text
