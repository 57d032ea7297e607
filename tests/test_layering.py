"""The layering rules (.importlinter): the core below the kernels below the outer ring, and no import cycles.

Each test lints a copy of the package tree (lazy imports inside functions are counted).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e .[dev])")


def _tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "moe_ref", tmp_path / "moe_ref", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", str(CONFIG)], cwd=tree, capture_output=True, text=True,
                          timeout=120)


def test_the_house_keeps_its_layering_rules(tmp_path):
    res = _lint(_tree(tmp_path))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "BROKEN" not in res.stdout and "0 broken" in res.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("layer.py", "    from moe_ref import hf  # noqa\n", "not allowed to import moe_ref.hf"),  # lazy, upward
    ("kernels/align.py", "    import moe_ref.metrics  # noqa\n", "not allowed to import moe_ref.metrics"),
    ("metrics.py", "    import moe_ref.batching  # noqa\n", "No cycles are allowed"),  # batching imports metrics
])
def test_a_broken_rule_fails(tmp_path, module, line, broken):
    tree = _tree(tmp_path)
    path = tree / "moe_ref" / module
    path.write_text(path.read_text() + "\n\ndef _breaks_the_house():\n" + line)
    res = _lint(tree)
    assert res.returncode != 0 and broken in res.stdout, res.stdout[-4000:]
