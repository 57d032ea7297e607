"""Every notebook under notebooks/ is committed clean and follows the notebook rules.

- no outputs and no execution counts (outputs are produced by `make tour` / nbmake, never committed);
- exactly one code cell tagged "parameters", and it reads MOE_REF_SMOKE (CI shrinks sizes with it);
- it imports moe_ref, checks itself with torch.testing.assert_close, and shows an ipywidgets panel
  (a call of a `*_panel(` function from moe_ref.widgets).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def _code(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    for prefix in ("01_", "02_", "03_", "04_", "05_"):
        assert any(n.startswith(prefix) for n in names), f"no notebook {prefix}* in {NB_DIR}: {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [(i, len(c.outputs), c.execution_count) for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells (index, outputs, execution_count) {dirty} carry outputs; strip them "
                       f"with `jupyter nbconvert --clear-output --inplace {path}`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_smoke_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in _code(nb) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one code cell tagged 'parameters', found {len(tagged)}"
    assert "MOE_REF_SMOKE" in tagged[0].source, f"{path.name}: the parameters cell does not read MOE_REF_SMOKE"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin_checked_and_interactive(path):
    nb = nbformat.read(path, as_version=4)
    src = "\n".join(c.source for c in _code(nb))
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{path.name}: must open with what the reader learns"
    assert "import moe_ref" in src or "from moe_ref" in src, f"{path.name} does not use moe_ref"
    assert "assert_close" in src, f"{path.name} never checks itself with torch.testing.assert_close"
    assert "_panel(" in src, f"{path.name} shows no ipywidgets panel (a moe_ref.widgets *_panel call)"
