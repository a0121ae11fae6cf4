"""How this copy of risgd is installed and run: the checkout it lives in (if any), the name of a command
as the user types it here, and the optional dependencies with the extra that brings each.

    command("data.manifest")   # 'risgd-manifest' when run as an installed command, else 'python -m data.manifest'
    need("sklearn.datasets", "the digits dataset")  # the module, or MissingExtra: pip install 'risgd[train]'

A leaf module like the rest of risgd_common: it imports nothing of the other parts.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType


def _checkout() -> str | None:
    """The repository root when this package runs from a checkout (an editable install or the source
    tree itself), None when it runs from an installed wheel."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    marks = ("pyproject.toml", "train.py", os.path.join("trainer", "train.py"))
    return root if all(os.path.isfile(os.path.join(root, m)) for m in marks) else None


CHECKOUT = _checkout()

# python -m MODULE (from a checkout's root) -> the command `pip install` puts on the path
COMMANDS = {
    "train.py": "risgd-train",
    "data.make_shards": "risgd-make-shards",
    "data.manifest": "risgd-manifest",
    "data.replicate": "risgd-replicate",
    "tools.compare": "risgd-compare",
    "tools.demo": "risgd-demo",
    "tools.paper": "risgd-paper",
    "hosts.netns_cluster": "risgd-netns-cluster",
    "risgd_planner": "risgd-cost-model",
}


def installed_names() -> bool:
    """Whether usage lines and hints should name the installed commands: this process is one
    (``sys.argv[0]`` is a ``risgd-*`` script), or the package runs outside a checkout, where the
    ``python -m data.X`` forms do not exist."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script.startswith("risgd-") or CHECKOUT is None


def command(module: str) -> str:
    """The command that runs ``module`` (a key of :data:`COMMANDS`) as the user would type it here."""
    if installed_names():
        return COMMANDS[module]
    return "python train.py" if module == "train.py" else f"python -m {module}"


# top-level module -> (the distribution pip installs, the extra of risgd that brings it)
EXTRAS = {
    "torchvision": ("torchvision", "train"),
    "wandb": ("wandb", "train"),
    "sklearn": ("scikit-learn", "train"),
    "matplotlib": ("matplotlib", "train"),
    "psutil": ("psutil", "train"),
    "simplejpeg": ("simplejpeg", "jpeg"),
}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency that is not installed. The message is one line naming what needs it
    and the install line of the extra that brings it; the commands print it as ``error: ...`` and
    exit 2."""


def install_line(extra: str) -> str:
    return f"pip install -e '.[{extra}]'" if CHECKOUT else f"pip install 'risgd[{extra}]'"


def need(module: str, what: str) -> ModuleType:
    """``importlib.import_module(module)``; when the optional package itself is missing,
    :class:`MissingExtra` saying that ``what`` needs it and how to install it."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if top not in EXTRAS or (e.name or "").split(".")[0] != top:
            raise  # something else is missing: not an optional dependency of ours
        dist, extra = EXTRAS[top]
        raise MissingExtra(f"{dist} is not installed, and {what} needs it: {install_line(extra)} installs it "
                           f"(the '{extra}' extra)", name=top) from None
