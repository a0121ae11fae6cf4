"""The RI-SGD paper, experiment by experiment: ``python -m recipes.paper`` (``make paper``, ``risgd-paper``).

One module per experiment, each with its settings, the paper's claim and its analysis side by side:
``fig2`` (Fig. 2), ``tau`` (Appendix A), ``diversity`` (Fig. 3), ``saturation`` (Fig. 4), ``failures``
(section 4.4) and ``theory`` (Theorem 4.2). What they share: ``grid`` (settings, experiments, the
grids), ``analysis`` (finished runs by setting, numbers, tables), ``verdict`` (the rules, fixed before
any run), ``plots`` (the PNGs); ``report`` writes paper.md and paper.json; ``cli`` is the command.
"""

from .cli import main

__all__ = ["main"]
