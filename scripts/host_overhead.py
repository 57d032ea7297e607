"""Host-side cost of one eager fused_moe call, kernels left out: what Python and torch spend per call.

At decode sizes a whole MoE layer streams little data (Qwen3-30B-A3B at T=1: 8 experts x 3 x 2048 x 768 x 2 B
= 75 MB, about 18 us at 4.3 TB/s), so the host work around the kernels decides whether the GPU waits. This
script replaces every Triton launch with a no-op and times fused_moe on CPU tensors: the checks, the config
choice, the plan's and outputs' allocations, the launchers' argument handling. Triton's own launch cost
(its C launcher, per kernel) and the GPU time are NOT included; the benchmark's `triton_graph` provider
shows what removing all host work does on a GPU.

  python scripts/host_overhead.py            # Mixtral and Qwen3-30B-A3B shapes, T = 1 and 64
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # import the kernels without a GPU; their launches are stubbed below

import torch  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> int:
    import moe_ref.kernels as mk

    fm = importlib.import_module("moe_ref.kernels.fused_moe")
    al = importlib.import_module("moe_ref.kernels.align")
    for mod in (fm, al):
        for name in dir(mod):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(mod, name, _NoLaunch())
    fm._launch = lambda *args, **kwargs: None
    fm.interpreter_active = lambda: False  # choose configs as on a GPU
    fm.require_backend = lambda x: None
    print(f"host: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"torch {torch.__version__}; kernels stubbed (Triton's launcher and GPU time not included)")
    for name, (D, F, E, K) in {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}.items():
        w13 = torch.empty(E, 2 * F, D, dtype=torch.bfloat16)  # [E, 2F, D] never read: launches are stubbed
        w2 = torch.empty(E, D, F, dtype=torch.bfloat16)  # [E, D, F]
        for T in (1, 64):
            x = torch.randn(T, D, dtype=torch.bfloat16)  # [T, D]
            ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])  # [T, K] distinct experts per token
            w = torch.rand(T, K)  # [T, K]
            for _ in range(100):
                mk.fused_moe(x, ids, w, w13, w2)
            n, t0 = 3000, time.perf_counter()
            for _ in range(n):
                mk.fused_moe(x, ids, w, w13, w2)
            print(f"{name:15s} T={T:3d}: {(time.perf_counter() - t0) / n * 1e6:6.1f} us per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
