"""Pure plotting functions: data in, matplotlib Figure out. Notebooks and widgets call these.

One submodule per topic; every name in a submodule's __all__ is re-exported here, so
`from moe_ref.plots import plot_x` works for all of them. Never imported by the core pipeline.
"""

import importlib
import pkgutil

import matplotlib

if "inline" not in matplotlib.get_backend().lower() and "widget" not in matplotlib.get_backend().lower():
    matplotlib.use("Agg")

__all__: list[str] = []
for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _mod = importlib.import_module(f"{__name__}.{_m.name}")
    for _name in getattr(_mod, "__all__", []):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
