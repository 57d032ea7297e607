"""ipywidgets panels: sliders and dropdowns wired to the pure functions in moe_ref.plots.

One submodule per notebook topic; every name in a submodule's __all__ is re-exported here.
Each panel calls its plotting function once statically first, so headless runs show a chart.
"""

import importlib
import pkgutil

__all__: list[str] = []
for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _mod = importlib.import_module(f"{__name__}.{_m.name}")
    for _name in getattr(_mod, "__all__", []):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
