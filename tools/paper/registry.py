"""The paper's experiments, found by registration: a new experiment is one new file.

Each module of ``tools/paper/experiments/`` builds one experiment (its runs, its analysis and its
checks) in a function decorated ``@register(order=N)``; the package imports every module in that
folder (``experiments/__init__.py``), and :func:`builders` hands them to ``Grid.experiments()`` in
report order. A leaf module: it imports no experiment, so nothing imports in a circle.
"""

from __future__ import annotations

from collections.abc import Callable

_BUILDERS: list[tuple[int, str, Callable]] = []  # (report order, module, build(grid) -> Experiment)


def register(order: int) -> Callable[[Callable], Callable]:
    """Decorator of an experiment module's ``experiment(grid)``: report it at position ``order``."""
    def add(build: Callable) -> Callable:
        if any(o == order for o, _, _ in _BUILDERS):
            taken = next(m for o, m, _ in _BUILDERS if o == order)
            raise ValueError(f"{build.__module__}: report order {order} is taken by {taken}: pick another")
        _BUILDERS.append((order, build.__module__, build))
        return build
    return add


def builders() -> list[tuple[str, Callable]]:
    """(module, build) of every registered experiment, in report order."""
    return [(module, build) for _, module, build in sorted(_BUILDERS, key=lambda t: t[0])]
