"""What the package ships next to its code: the recipes (``recipes/*.yaml``) and the DeepSpeed configs
(``ds_configs/*.json``), found the same way in a checkout and in an installed wheel.

In a checkout they are the repository's folders; ``pip install`` puts them into the package as
``risgd_recipes/*.yaml`` and ``risgd_recipes/ds_configs/*.json``. A recipe is named by path or by
name (``digits``, ``digits.yaml`` and ``recipes/digits.yaml`` are the bundled digits recipe when
no such file exists where the command runs). A leaf module: the recipe config uses it.
"""

from __future__ import annotations

import os

from risgd_common.install import CHECKOUT

RECIPES = os.path.dirname(os.path.abspath(__file__))  # recipes/ in a checkout, risgd_recipes/ installed
DS_CONFIGS = (os.path.join(RECIPES, "ds_configs") if os.path.isdir(os.path.join(RECIPES, "ds_configs"))
              else os.path.join(CHECKOUT or RECIPES, "ds_configs"))


def recipe_names() -> list[str]:
    """The bundled recipes' names (``digits``, ``cifar10_resnet44``, ...)."""
    try:
        return sorted(n[:-5] for n in os.listdir(RECIPES) if n.endswith(".yaml"))
    except OSError:
        return []


def ds_config_names() -> list[str]:
    """The bundled DeepSpeed configs (``ds_configs/digits.json``, ...), as a recipe names them."""
    try:
        return sorted(f"ds_configs/{n}" for n in os.listdir(DS_CONFIGS) if n.endswith(".json"))
    except OSError:
        return []


def bundled_recipe(path: str) -> str | None:
    """The bundled recipe that ``path`` names (``NAME``, ``NAME.yaml`` or ``recipes/NAME.yaml``), or None."""
    if os.path.isabs(path):
        return None
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "recipes"):
        return None
    stem = parts[-1][:-5] if parts[-1].endswith(".yaml") else parts[-1]
    candidate = os.path.join(RECIPES, f"{stem}.yaml")
    return candidate if stem and os.path.isfile(candidate) else None


def ds_config_candidates(path: str, recipe: str | None) -> list[str]:
    """Where a recipe's ``ds_config: PATH`` may be, in order: as given (relative to the working
    directory, as it always was), relative to the recipe file's directory and to the one above it
    (a project laid out like this repository: ``recipes/NAME.yaml`` next to ``ds_configs/``), then
    the bundled configs (``ds_configs/NAME.json`` or ``NAME.json``)."""
    if os.path.isabs(path):
        return [path]
    out = [path]
    if recipe:
        here = os.path.dirname(os.path.abspath(recipe))
        out += [os.path.join(here, path), os.path.join(os.path.dirname(here), path)]
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "ds_configs"):
        out.append(os.path.join(DS_CONFIGS, parts[-1]))
    return list(dict.fromkeys(out))
