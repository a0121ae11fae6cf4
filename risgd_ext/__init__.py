"""risgd_ext: RI-SGD (redundancy-infused local SGD) for DeepSpeed engines.

Replace ``deepspeed.initialize`` by ``risgd_ext.initialize`` and add a ``"risgd"`` block to the
DeepSpeed config: per-step gradient all-reduce is switched off and parameters are averaged across
ranks every ``tau`` optimizer steps.

The map of the engine (one job per module) is written once, in docs/engine.md, "The map of the
engine"; each module's docstring says its own job.

Importing this package imports DeepSpeed only when ``initialize``, ``attach``,
``init_distributed`` or ``RISGDController`` is first used.
"""

from risgd_common.aliases import install

from .config import ConfigError, RISGDConfig, parse_block

install()  # risgd_ext.cost_model, its old name, is the planner (risgd_planner), which the engine never imports

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
