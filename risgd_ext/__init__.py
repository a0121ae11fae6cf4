"""risgd_ext: RI-SGD (redundancy-infused local SGD) for DeepSpeed engines.

Replace ``deepspeed.initialize`` by ``risgd_ext.initialize`` and add a ``"risgd"`` block to the
DeepSpeed config: per-step gradient all-reduce is switched off and parameters are averaged across
ranks every ``tau`` optimizer steps.

The map of the engine, one job per module:

- ``config``: the ``"risgd"`` block, each key declared once (default, validator, help);
- ``engine``: ``initialize`` / ``attach``, the DeepSpeed engine subclass, per-rank checkpoints;
- ``controller``: the schedule (sync, local, round, intra-node average) and the accounting;
- ``round``: one averaging round's life (send, wait, apply, view, state) and its two seams;
- ``flat``: the model as flat buffers, the anchor, the arithmetic of an average;
- ``reduce``: the collectives of a round (flat or node level) and a node's gradient all-reduce;
- ``topology``: the node level's process groups, from ``risgd_common.layout.Layout``;
- ``failures``: the simulated failure schedule;
- ``cost_model``: the alpha-beta model and ``risgd-cost-model`` (imports no DeepSpeed).

Importing this package imports DeepSpeed only when ``initialize``, ``attach``,
``init_distributed`` or ``RISGDController`` is first used.
"""

from .config import ConfigError, RISGDConfig, parse_block

__all__ = ["ConfigError", "RISGDConfig", "RISGDController", "attach", "init_distributed", "initialize",
           "parse_block"]

_LAZY = {"RISGDController": "controller", "attach": "engine", "init_distributed": "engine", "initialize": "engine"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
