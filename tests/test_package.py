"""Install layout: kernels/ is moe_ref.kernels and never a top-level `kernels`."""

import pathlib
import subprocess
import sys
import textwrap

import moe_ref


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
    assert other == "none" or not other.startswith(str(root)), other


def test_public_names():
    for name in moe_ref.__all__:
        assert hasattr(moe_ref, name), name
    assert {"dense", "loop", "grouped", "grouped_mm", "padded", "triton"} <= set(moe_ref.strategy_names())
