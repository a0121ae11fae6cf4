"""One import name per file: a checkout's folder names (``data``, ``recipes``, ``models``, ``hosts``)
as aliases of the names the project installs them under (``risgd_data``, ``risgd_recipes``, ...).

In a checkout, ``python -m data.make_shards`` or ``import recipes.config`` would otherwise load the
files of ``data/`` and ``recipes/`` a second time, under their folder names, beside the
``risgd_data.*`` and ``risgd_recipes.*`` modules the rest of the code imports: two ``RecipeError``
classes, and an ``except`` that catches one of them. Each such folder's ``__init__.py`` calls
:func:`alias` when it is imported by its folder name; from then on

- ``import data`` and ``import data.manifest`` give the modules ``risgd_data`` and
  ``risgd_data.manifest`` themselves (the same objects, entered in ``sys.modules`` under both names);
- ``python -m data.make_shards ARGS`` runs a two-line ``__main__`` that calls
  ``risgd_data.make_shards.main()``, so the file is loaded once, as ``risgd_data.make_shards`` (a
  module without ``main()`` is run by ``runpy.run_module`` under its installed name instead).

The same approach as ``sys.modules`` aliasing in the standard library's own test support; no file
is copied and nothing changes for the installed names. A leaf module: it imports nothing of the
project.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

ALIASES: dict[str, str] = {}  # checkout name -> installed name, e.g. "data" -> "risgd_data"
# Modules that moved, by their old installed name (a package moves with everything under it): the old
# names keep working, installed (risgd_recipes.train) and in a checkout (python -m recipes.demo).
# recipes/ held the trainer and the tools until they got rooms of their own (trainer/, tools/); the engine
# held the cost model (risgd_ext.cost_model, now risgd_planner: the engine package installs the finder).
MOVED: dict[str, str] = {
    "risgd_recipes.netns_cluster": "risgd_hosts.netns_cluster",
    **{f"risgd_recipes.{m}": f"risgd_trainer.{m}"
       for m in ("train", "lr_schedule", "evaluation", "tracking", "naming", "elastic", "agree")},
    "risgd_recipes.config": "risgd_trainer.run_config",
    **{f"risgd_recipes.{m}": f"risgd_tools.{m}" for m in ("compare", "demo", "launch", "elastic_launch", "paper")},
    # the cost model left the engine for a room of its own (the model and its command: risgd_planner)
    "risgd_ext.cost_model": "risgd_planner",
}


def installed_name(name: str) -> str | None:
    """The installed name of a module named by its checkout name (``data.manifest`` ->
    ``risgd_data.manifest``) or by a name it had before it moved (``risgd_recipes.config`` ->
    ``risgd_trainer.run_config``), or None when neither applies."""
    top, _, rest = name.partition(".")
    if top in ALIASES:
        name = ALIASES[top] + ("." + rest if rest else "")
    parts = name.split(".")
    for cut in range(len(parts), 1, -1):  # the longest moved prefix: risgd_recipes.paper.grid moves with paper
        head = ".".join(parts[:cut])
        if head in MOVED:
            name = ".".join([MOVED[head], *parts[cut:]])
            break
    return None if top not in ALIASES and name == ".".join(parts) else name


class _AliasLoader(importlib.abc.Loader):
    """Loads a checkout name as the installed module itself; runs it as ``__main__`` by its ``main()``."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed, once, under its installed name

    def get_code(self, fullname: str):
        """What ``python -m CHECKOUT.NAME`` runs as ``__main__`` (``runpy`` asks the loader for the code;
        for a package it asks for ``PACKAGE.__main__``): the installed module's ``main()``."""
        # Only as __main__: a process that multiprocessing spawns re-runs the parent's main module under
        # the name __mp_main__, and must import the module, not run the command again.
        source = (f"import importlib, runpy, sys\n"
                  f"_target = importlib.import_module({self.target!r})\n"
                  f"if __name__ == '__main__' and hasattr(_target, 'main'):\n"
                  f"    sys.exit(_target.main())\n"
                  f"elif __name__ == '__main__':\n"
                  f"    runpy.run_module({self.target!r}, run_name='__main__', alter_sys=True)\n")
        return compile(source, f"<{fullname}: an alias of {self.target}>", "exec")

    def is_package(self, fullname: str) -> bool:
        spec = importlib.util.find_spec(self.target)
        return spec is not None and spec.submodule_search_locations is not None


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        installed = installed_name(fullname)
        if installed is None or installed == fullname:
            return None
        real = importlib.util.find_spec(installed)
        if real is None:
            return None
        loader = _AliasLoader(installed)
        spec = importlib.machinery.ModuleSpec(fullname, loader, origin=real.origin,
                                              is_package=real.submodule_search_locations is not None)
        if real.submodule_search_locations is not None:
            spec.submodule_search_locations = list(real.submodule_search_locations)
        return spec


_FINDER = _AliasFinder()


def install() -> None:
    """Put the finder of these names first on ``sys.meta_path`` (once): called by :func:`alias` and by
    the ``risgd_recipes`` and ``risgd_ext`` packages, whose moved modules keep their old names."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def alias(checkout: str, installed: str) -> ModuleType:
    """Make the checkout name ``checkout`` (a folder imported by its own name) the installed package
    ``installed``: called from the folder's ``__init__.py`` when ``__name__ == checkout``. Returns
    the installed package, which the caller's ``sys.modules`` entry now is."""
    ALIASES[checkout] = installed
    install()
    package = importlib.import_module(installed)
    sys.modules[checkout] = package
    return package
