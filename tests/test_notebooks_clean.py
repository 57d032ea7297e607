"""Every notebook under notebooks/ is committed clean and follows the notebook rules.

- no outputs and no execution counts (outputs are produced by `make tour` / nbmake, never committed);
- exactly one code cell tagged "parameters", and it reads MOE_REF_SMOKE (CI shrinks sizes with it);
- it imports moe_ref, checks itself with torch.testing.assert_close, and shows an ipywidgets panel
  (a call of a `*_panel(` function from moe_ref.widgets);
- it ends with exercises the reader solves in code, each checked by a `moe_ref.exercises.check_*` on a stub
  that raises NotImplementedError (so the untouched notebook runs green), and a "Further reading" cell of
  linked papers and code, one line each on what to look at there;
- it speaks of this project alone: no "seed" text or issue numbers from outside the repository.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from helpers import read_notebook
from moe_ref import exercises

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
    nb = read_notebook(path)
    dirty = [(i, len(c.outputs), c.execution_count) for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells (index, outputs, execution_count) {dirty} carry outputs; strip them "
                       f"with `jupyter nbconvert --clear-output --inplace {path}`")


@pytest.mark.slow  # nbformat imports jsonschema: seconds per process
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_nbformat(path):
    import nbformat

    nbformat.validate(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_smoke_parameters_cell(path):
    nb = read_notebook(path)
    tagged = [c for c in _code(nb) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one code cell tagged 'parameters', found {len(tagged)}"
    assert "MOE_REF_SMOKE" in tagged[0].source, f"{path.name}: the parameters cell does not read MOE_REF_SMOKE"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin_checked_and_interactive(path):
    nb = read_notebook(path)
    src = "\n".join(c.source for c in _code(nb))
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{path.name}: must open with what the reader learns"
    assert "import moe_ref" in src or "from moe_ref" in src, f"{path.name} does not use moe_ref"
    assert "assert_close" in src, f"{path.name} never checks itself with torch.testing.assert_close"
    assert "_panel(" in src, f"{path.name} shows no ipywidgets panel (a moe_ref.widgets *_panel call)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ends_with_further_reading(path):
    nb = read_notebook(path)
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and last.source.startswith("## Further reading"), \
        f"{path.name}: the last cell must be the '## Further reading' list"
    items = [ln for ln in last.source.split("\n- ")[1:]]
    assert len(items) >= 3, f"{path.name}: further reading lists {len(items)} entries, want at least 3"
    for item in items:
        links = re.findall(r"<(https://[^>\s]+)>", item)
        assert links, f"{path.name}: further-reading entry without a link: {item[:80]!r}"
        words = re.sub(r"<https://[^>]+>|\*\*[^*]+\*\*", "", item)  # what is left besides the links and title
        assert len(words.split()) >= 8, f"{path.name}: say what to look at there: {item[:80]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_checked_exercises_with_stubs(path):
    nb = read_notebook(path)
    heads = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    assert len(heads) == 1, f"{path.name}: expected one '## Exercises' section"
    code = [c.source for c in nb.cells[heads[0]:] if c.cell_type == "code"]
    checks = [m for src in code for m in re.findall(r"^(check_\w+)\(", src, flags=re.M)]
    assert 2 <= len(checks) <= 3, f"{path.name}: {len(checks)} checked exercises, want 2 or 3"
    unknown = sorted(set(checks) - set(exercises.__all__))
    assert not unknown, f"{path.name}: {unknown} are not checkers of moe_ref.exercises"
    for src in code:
        for fn in (n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)):
            raises = [n for n in ast.walk(fn) if isinstance(n, ast.Raise) and "NotImplementedError" in ast.unparse(n)]
            assert raises, f"{path.name}: stub {fn.name} must raise NotImplementedError (solutions live in tests)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_speaks_of_the_project_alone(path):
    nb = read_notebook(path)
    text = "\n".join(c.source for c in nb.cells)
    for bad in (r"\bseed coverage\b", r"\bthe seed\b", r"\bseed's\b", r"seed/", r"\bissue #?\d+", r"DESIGN\.md"):
        assert not re.search(bad, text, flags=re.I), f"{path.name} mentions {bad!r}: speak of this project alone"
