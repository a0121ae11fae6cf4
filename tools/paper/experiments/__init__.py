"""The paper's experiments, one module each, registered by ``@register(order=N)`` (``..registry``):
importing this package imports every module in this folder, so a new experiment is one new file."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
