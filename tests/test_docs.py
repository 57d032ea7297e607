"""The docs match the code: every public name in docs/api.md, every module in the architecture map,
README linking the docs, every relative link resolving, every committed chart shown.

Regenerate the API page with `python -m moe_ref.apidoc > docs/api.md`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moe_ref import apidoc

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REGEN = "regenerate it: python -m moe_ref.apidoc > docs/api.md"


def _api_headings() -> set[str]:
    text = (DOCS / "api.md").read_text()
    return set(re.findall(r"^### `([\w.]+)`", text, flags=re.M))


def test_every_public_name_is_in_api_md():
    documented = _api_headings()
    modules = apidoc.documented()
    assert "moe_ref" in modules and "moe_ref.hf" in modules
    missing = [f"{m}.{n}" for m, names in modules.items() for n in names if f"{m}.{n}" not in documented]
    assert not missing, f"public names missing from docs/api.md: {missing}; {REGEN}"


def test_api_md_has_no_stale_names():
    public = {f"{m}.{n}" for m, names in apidoc.documented().items() for n in names}
    stale = sorted(_api_headings() - public)
    assert not stale, f"docs/api.md documents names that are no longer public: {stale}; {REGEN}"


def test_apidoc_renders_every_name_with_its_docstring():
    text = apidoc.render()
    for m, names in apidoc.documented().items():
        for n in names:
            assert f"### `{m}.{n}`" in text
    # a docstring of the code shows up verbatim (first line)
    assert apidoc.render() == text  # deterministic: regenerating an unchanged tree changes nothing
    import moe_ref.hf as hf

    assert hf.patch_model.__doc__.strip().split("\n")[0] in text


def test_public_names_resolve():
    for m, names in apidoc.documented().items():
        mod = apidoc.load(m)
        for n in names:
            assert hasattr(mod, n), f"{m}.__all__ lists {n!r} but {m} has no such attribute"


def _module_files() -> list[str]:
    files = sorted(p.name for p in (ROOT / "moe_ref").glob("*.py"))
    files += sorted(p.name for p in (ROOT / "moe_ref" / "kernels").glob("*.py"))
    return sorted(set(files))


def test_architecture_module_map_is_complete():
    text = (DOCS / "architecture.md").read_text()
    missing = [f for f in _module_files() if f"`{f}`" not in text]
    assert not missing, f"add these modules to the module map in docs/architecture.md: {missing}"
    for d in ("plots/", "widgets/", "kernels/", "notebooks/"):
        assert d in text


def test_architecture_has_a_diagram():
    text = (DOCS / "architecture.md").read_text()
    assert "```mermaid" in text and "flowchart" in text


def test_readme_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    for page in ("docs/architecture.md", "docs/api.md", "docs/results.md"):
        assert f"]({page})" in readme, f"README.md must link {page}"
        assert (ROOT / page).is_file()


def _links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # links inside code blocks are not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("md", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in DOCS.glob("*.md"))])
def test_relative_links_resolve(md):
    path = ROOT / md
    broken = []
    for link in _links(path):
        if re.match(r"^[a-z]+:", link) or link.startswith("#"):
            continue
        target = (path.parent / link.split("#")[0]).resolve()
        if not target.exists():
            broken.append(link)
    assert not broken, f"{md}: broken relative links {broken}"


def test_results_page_shows_every_committed_chart():
    text = (DOCS / "results.md").read_text()
    assert "make bench" in text and "make gpu-check" in text and "](results/)" in text
    charts = sorted((DOCS / "results").rglob("*.png")) if (DOCS / "results").is_dir() else []
    unshown = [str(p.relative_to(DOCS)) for p in charts if str(p.relative_to(DOCS)) not in text]
    assert not unshown, f"docs/results.md does not show these committed charts: {unshown}"
    if not any((DOCS / "results").rglob("*.json")):
        assert "No GPU run has been committed yet" in text  # say so plainly while there is none


def test_every_public_class_and_function_has_its_own_docstring():
    """A name in docs/api.md with no docstring of its own would render as an empty entry."""
    import inspect

    bare = []
    for m, names in apidoc.documented().items():
        mod = apidoc.load(m)
        for n in names:
            obj = getattr(mod, n)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # constants are described in their module's docstring
            doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
            if not doc or not doc.strip() or doc.startswith(f"{obj.__name__}("):  # dataclass auto-doc
                bare.append(f"{m}.{n}")
    assert not bare, f"public names without a docstring: {bare}"


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_snippets_define_every_name_they_use():
    """Each README Python snippet runs on its own: every name it reads is imported or assigned in it."""
    import ast
    import builtins

    blocks = _readme_python_blocks()
    assert len(blocks) >= 2, "README.md should show the quick start and the Hugging Face snippet"
    for code in blocks:
        tree = ast.parse(code)
        bound = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert not used - bound, f"README snippet uses undefined names {sorted(used - bound)}:\n{code}"


@pytest.mark.slow
def test_readme_snippets_run():
    for code in _readme_python_blocks():
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example code


def test_readme_says_how_to_choose_the_torch_build():
    readme = (ROOT / "README.md").read_text()
    assert "TORCH_SPEC" in readme and "download.pytorch.org/whl/cpu" in readme and "CUDA" in readme
    assert "make browser-deps" in readme and "CI=true" in readme
