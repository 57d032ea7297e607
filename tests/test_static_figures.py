"""Every widget panel leaves a plain PNG in the executed notebook, so static renders show a chart.

The HTML that `make tour` (nbconvert) writes loads the widget JavaScript from a CDN: offline, a widget cell
is blank there. So each panel also displays its first figure as an image/png output of its cell
(`moe_ref.widgets._panel.show_static`). Checked here in a real kernel (nbclient, as nbmake and nbconvert run
notebooks): a small notebook calling every panel that moe_ref.widgets exports, and notebook 04 at smoke size.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest

from helpers import read_notebook
from moe_ref import widgets

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
PANELS = sorted(n for n in widgets.__all__ if n.endswith("_panel"))


def _callable_bare(name: str) -> bool:
    sig = inspect.signature(getattr(widgets, name))
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values())


BARE = [n for n in PANELS if _callable_bare(n)]  # the panels that run with no arguments
PANEL_CALL = re.compile(r"\b(\w+_panel)\(")


def _execute(nb, cwd: Path, timeout: int = 240):
    from nbclient import NotebookClient

    env = {"MOE_REF_SMOKE": "1", "TRITON_INTERPRET": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def panel_cells_without_png(nb) -> list[str]:
    """The source of every executed code cell that calls a `*_panel(` but has no image/png output."""
    missing = []
    for c in nb.cells:
        if c.cell_type == "code" and PANEL_CALL.search(c.source):
            if not any("image/png" in o.get("data", {}) for o in c.outputs):
                missing.append(c.source)
    return missing


def test_there_are_panels():
    assert len(PANELS) >= 7 and len(BARE) >= 7, (PANELS, BARE)


@pytest.mark.parametrize("name", PANELS)
def test_every_panel_is_built_by_make_panel(name):
    """make_panel draws the static first figure, so a panel built with it leaves a PNG in any executed notebook."""
    assert "make_panel(" in inspect.getsource(getattr(widgets, name)), f"{name} does not build on make_panel"


def test_show_static_is_silent_outside_a_kernel(capsys):
    from matplotlib.figure import Figure

    from moe_ref.widgets._panel import show_static

    assert show_static(Figure()) is False
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("path", sorted(NB_DIR.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_panels_are_known_panels(path):
    """Every panel a notebook calls is one of moe_ref.widgets' panels, so the kernel test below covers it."""
    nb = read_notebook(path)
    called = {m for c in nb.cells if c.cell_type == "code" for m in PANEL_CALL.findall(c.source)}
    unknown = sorted(called - set(PANELS))
    assert not unknown, f"{path.name} calls panels that moe_ref.widgets does not export: {unknown}"


@pytest.mark.slow
def test_every_panel_leaves_a_png_in_an_executed_notebook(tmp_path):
    import nbformat

    cells = [nbformat.v4.new_code_cell("%matplotlib inline\nfrom moe_ref import widgets")]
    cells += [nbformat.v4.new_code_cell(f"widgets.{name}()") for name in BARE]
    nb = _execute(nbformat.v4.new_notebook(cells=cells), tmp_path)
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    assert not panel_cells_without_png(nb), f"panels without a static PNG: {panel_cells_without_png(nb)}"
    for c in nb.cells[1:]:  # and the live panel is still there, after its static figure
        kinds = [k for o in c.outputs for k in o.get("data", {})]
        assert "application/vnd.jupyter.widget-view+json" in kinds, (c.source, kinds)
        assert kinds.index("image/png") < kinds.index("application/vnd.jupyter.widget-view+json"), (c.source, kinds)


@pytest.mark.slow
def test_an_executed_notebook_has_a_png_for_its_panel():
    import nbformat

    path = NB_DIR / "04_permutation.ipynb"
    nb = _execute(nbformat.read(path, as_version=4), NB_DIR)
    assert any(PANEL_CALL.search(c.source) for c in nb.cells if c.cell_type == "code")
    assert not panel_cells_without_png(nb), f"{path.name}: panel cells without a PNG: {panel_cells_without_png(nb)}"
