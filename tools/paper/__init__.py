"""The RI-SGD paper, experiment by experiment: ``python -m tools.paper`` (``make paper``, ``risgd-paper``).

One module per experiment in ``experiments/``, each with its settings, the paper's claim and its
analysis side by side, found by registration (``registry``: a new experiment is one new file):
``fig2`` (Fig. 2), ``tau`` (Appendix A), ``diversity`` (Fig. 3), ``saturation`` (Fig. 4),
``failed_workers`` (section 4.4), ``theory`` (Theorem 4.2), ``homogeneous``, ``equalcompute`` and
``workers``. What they share: ``grid`` (settings, experiments, the grids), ``analysis`` (finished
runs by setting, numbers, tables), ``verdict`` (the rules, fixed before any run), ``plots`` (the
PNGs), ``engine_stamp`` (which engine trained a run); ``report`` writes paper.md and paper.json;
``cli`` is the command.
"""

from . import experiments  # noqa: F401  (imports and so registers every experiment)
from .cli import main

__all__ = ["main"]
