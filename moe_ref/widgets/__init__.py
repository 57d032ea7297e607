"""ipywidgets panels: sliders and dropdowns wired to the pure functions in moe_ref.plots.

One submodule per notebook topic; every name in a submodule's __all__ is re-exported here.
Each panel also displays its first chart as a plain PNG of the cell (`_panel.show_static`), so the HTML of an
executed notebook shows a chart even where the widget JavaScript cannot load.
"""

import importlib
import pkgutil

__all__: list[str] = []
for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _mod = importlib.import_module(f"{__name__}.{_m.name}")
    for _name in getattr(_mod, "__all__", []):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
