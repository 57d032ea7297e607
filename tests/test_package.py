"""Install layout: the kernels are moe_ref.kernels, and the repo provides no top-level `kernels`."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

import moe_ref

ROOT = pathlib.Path(moe_ref.__file__).resolve().parent.parent


@pytest.mark.slow  # a fresh interpreter: left out of make check
@pytest.mark.parametrize("cwd", ["elsewhere", "repo root"])
def test_kernels_is_subpackage_not_top_level(tmp_path, cwd):
    """`kernels` is Hugging Face's name (transformers imports it): from anywhere, ours must not answer to it."""
    code = textwrap.dedent("""
        import importlib.util, pathlib
        import moe_ref.kernels as k
        print(pathlib.Path(k.__file__).resolve().parent)
        spec = importlib.util.find_spec("kernels")
        print("none" if spec is None else (spec.origin or ",".join(spec.submodule_search_locations or [])))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT if cwd == "repo root" else tmp_path,
                         capture_output=True, text=True, check=True)
    ours, other = out.stdout.split("\n")[:2]
    assert pathlib.Path(ours) == ROOT / "moe_ref" / "kernels"
    assert other == "none" or not other.startswith((str(ROOT / "moe_ref"), str(ROOT / "kernels"))), other


def test_public_names():
    for name in moe_ref.__all__:
        assert hasattr(moe_ref, name), name
    assert {"dense", "loop", "grouped", "grouped_mm", "padded", "triton"} <= set(moe_ref.strategy_names())


@pytest.mark.slow  # a fresh interpreter: left out of make check
def test_transformers_unaffected_from_repo_root():
    """From the repo root (on sys.path) transformers imports, and whatever `kernels` it finds is not ours."""
    pytest.importorskip("transformers")
    code = textwrap.dedent("""
        import importlib.util
        from transformers import MixtralConfig, MixtralForCausalLM  # imports the hub-kernels integration
        spec = importlib.util.find_spec("kernels")
        print("none" if spec is None else (spec.origin or "namespace"))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    found = out.stdout.split()[-1]
    assert found == "none" or not found.startswith((str(ROOT / "moe_ref"), str(ROOT / "kernels"))), found


def test_every_subpackage_is_listed_for_installation():
    """A wheel holds only the packages pyproject.toml lists: a new subpackage must be added there."""
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"moe_ref." + p.parent.relative_to(root / "moe_ref").as_posix().replace("/", ".")
             for p in (root / "moe_ref").rglob("__init__.py") if p.parent != root / "moe_ref"}
    assert found | {"moe_ref"} <= listed, sorted(found - listed)
