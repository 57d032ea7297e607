"""moe_ref.bench: the only place that times kernels or writes benchmark charts.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
  shapes.py     Shape, SHAPES (model and CPU presets), DTYPES, token counts
  timing.py     Timer (triton.testing.do_bench on CUDA, torch.utils.benchmark elsewhere), time_cpu
                (providers interleaved, median + IQR), measure_limits (copy bandwidth, matmul rate)
  providers.py  what is timed: moe_ref strategies, transformers' experts, triton, triton_graph
  malloc.py     the host allocator of a CPU benchmark process (keep freed memory, as a caching allocator does)
  cpu.py        the CPU benchmark against the GEMM-only bound
  sweep.py      the device sweep over shapes x token counts x providers
  targets.py    the GPU targets as data, and their evaluation
  report.py     machine record, JSON, charts, summary table
  results.py    merging per-process results; the committed results under docs/results
  tune.py       tile-config tuning for fused_moe on the GPU at hand
  cli.py        python -m moe_ref.bench cpu|gpu|merge|plot|tune (console script moe-ref-bench)
"""

from .cpu import bench_cpu, gemm_only, print_table
from .shapes import DTYPES, GPU_SHAPES, GPU_TOKENS, QUICK_TOKENS, SHAPES, Shape
from .timing import Timer, time_cpu

__all__ = ["Shape", "SHAPES", "DTYPES", "GPU_SHAPES", "GPU_TOKENS", "QUICK_TOKENS", "Timer", "time_cpu",
           "bench_cpu", "gemm_only", "print_table", "main"]


def main(argv=None) -> int:
    """python -m moe_ref.bench ...: see moe_ref.bench.cli."""
    from .cli import main as _main

    return _main(argv)
