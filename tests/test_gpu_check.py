"""scripts/gpu_check.sh (make gpu-check) walks all its steps in a dry run on the CPU (GPU_CHECK_DRY_RUN=1).

The GPU machine is lent rarely and for minutes, so the script must not fail there for a reason a CPU
machine could have shown: a bash error, a step that cannot find its files, a flag the CLI lacks."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_walks_every_step(tmp_path):
    out = tmp_path / "gpu-check"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", TRITON_INTERPRET="1",
               BENCH_ARGS="--tokens 1 --providers loop grouped triton", TUNE_ARGS="--tokens 2")
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    for step in ("pytest-gpu: rc=0", "tune: rc=0", "bench: rc=0"):
        assert step in log, log[-4000:]
    for name in ("env.txt", "gpu_check.log", "pytest-gpu.xml", "tuned.json", "tuned.png", "gpu.json", "gpu_times.png"):
        assert (out / name).is_file(), f"{name} missing; {sorted(x.name for x in out.iterdir())}"
    assert "--tuned" in log and str(out / "tuned.json") in log  # the sweep ran with the tuned table
