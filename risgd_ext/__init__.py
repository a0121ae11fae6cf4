"""risgd_ext: RI-SGD (redundancy-infused local SGD) for DeepSpeed engines.

Replace ``deepspeed.initialize`` by ``risgd_ext.initialize`` and add a ``"risgd"`` block to the
DeepSpeed config: per-step gradient all-reduce is switched off and parameters are averaged across
ranks every ``tau`` optimizer steps.
"""

from .config import ConfigError, RISGDConfig, parse_block
from .controller import RISGDController
from .engine import attach, init_distributed, initialize

__all__ = ["ConfigError", "RISGDConfig", "RISGDController", "attach", "init_distributed", "initialize",
           "parse_block"]
