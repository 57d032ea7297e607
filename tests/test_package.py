"""Install layout: kernels/ is moe_ref.kernels and never a top-level `kernels`."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

import moe_ref


@pytest.mark.slow  # a fresh interpreter: left out of make check
def test_kernels_is_subpackage_not_top_level(tmp_path):
    code = textwrap.dedent("""
        import importlib.util, pathlib
        import moe_ref.kernels as k
        print(pathlib.Path(k.__file__).parent.name)
        spec = importlib.util.find_spec("kernels")
        print("none" if spec is None else spec.origin)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    ours, other = out.stdout.split()
    assert ours == "kernels"
    root = pathlib.Path(moe_ref.__file__).parent.parent
    assert other == "none" or not other.startswith(str(root / "kernels")), other  # HF's own (a venv may be in root)


def test_public_names():
    for name in moe_ref.__all__:
        assert hasattr(moe_ref, name), name
    assert {"dense", "loop", "grouped", "grouped_mm", "padded", "triton"} <= set(moe_ref.strategy_names())


@pytest.mark.slow  # a fresh interpreter: left out of make check
def test_transformers_unaffected_from_repo_root():
    """From the repo root (on sys.path) transformers' probe for HF `kernels` must see "not installed"."""
    pytest.importorskip("transformers")
    root = pathlib.Path(moe_ref.__file__).parent.parent
    code = textwrap.dedent("""
        from transformers.utils.import_utils import is_kernels_available
        from transformers import MixtralConfig, MixtralForCausalLM  # imports the hub-kernels integration
        import kernels
        print(is_kernels_available(), hasattr(kernels, "fused_moe"))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]


def test_every_subpackage_is_listed_for_installation():
    """A wheel holds only the packages pyproject.toml lists: a new subpackage must be added there."""
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"moe_ref." + p.parent.relative_to(root / "moe_ref").as_posix().replace("/", ".")
             for p in (root / "moe_ref").rglob("__init__.py") if p.parent != root / "moe_ref"}
    assert found | {"moe_ref", "moe_ref.kernels"} <= listed, sorted(found - listed)
