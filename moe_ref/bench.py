"""Benchmarks: time every strategy side by side, against the GEMM-only bound, in one run.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
`python -m moe_ref.bench` (CPU) times dense / loop / grouped / grouped_mm and the GEMM-only bound
(the same per-expert matmuls on pre-grouped rows: no routing, no data movement) and writes
JSON (machine, versions, shapes, medians) and a PNG chart under build/bench/.
Speed goals are ratios printed here, never timed tests.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import MoEConfig
from .layer import MoELayer
from .reference import swiglu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int


SHAPES = {
    "cpu": Shape("cpu", 1024, 2048, 8, 2),
    "cpu-small": Shape("cpu-small", 256, 512, 8, 2),
    "mixtral": Shape("mixtral-8x7b", 4096, 14336, 8, 2),
    "qwen3": Shape("qwen3-30b-a3b", 2048, 768, 128, 8),
    "olmoe": Shape("olmoe-1b-7b", 2048, 1024, 64, 8),
    "deepseek": Shape("deepseek-v3-routed", 7168, 2048, 256, 8),
}


def time_cpu(fn, warmup: int = 1, reps: int = 5) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gemm_only(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor):
    """A callable doing just the per-expert GEMMs (+SwiGLU) on pre-grouped rows: the compute bound."""
    blocks = [x.new_empty(n, x.shape[1]).normal_() for n in counts]

    def run():
        for e, xb in enumerate(blocks):
            if xb.shape[0]:
                swiglu(xb @ w13[e].t()) @ w2[e].t()

    return run


def machine_info() -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": "cpu: " + (platform.processor() or platform.machine()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def bench_cpu(shape: Shape, token_counts, dtypes, strategies, reps: int, progress: bool = True) -> list[dict]:
    """Median seconds per (dtype, T, provider) on the CPU, with ratios to the GEMM-only bound."""
    cfg = MoEConfig(shape.d_model, shape.d_ff, shape.num_experts, shape.top_k)
    jobs = [(dt, T) for dt in dtypes for T in token_counts]
    bar = _progress(len(jobs) * (len(strategies) + 1), progress)
    rows = []
    for dt_name, T in jobs:
        dtype = DTYPES[dt_name]
        layer = MoELayer(cfg, dtype=dtype, seed=0)
        x = torch.randn(T, shape.d_model, generator=torch.Generator().manual_seed(1)).to(dtype)
        with torch.inference_mode():
            r = layer.route(x)
            counts = torch.bincount(r.topk_ids.reshape(-1), minlength=shape.num_experts).tolist()
            bound = time_cpu(gemm_only(x, counts, layer.w13, layer.w2), reps=reps)
            bar.update(1)
            rows.append(dict(shape=shape.name, dtype=dt_name, tokens=T, provider="gemm_only", seconds=bound,
                             ratio_to_bound=1.0))
            for s in strategies:
                sec = time_cpu(lambda s=s, L=layer, x=x, r=r: L(x, strategy=s, routing=r), reps=reps)
                rows.append(dict(shape=shape.name, dtype=dt_name, tokens=T, provider=s, seconds=sec,
                                 ratio_to_bound=sec / bound))
                bar.update(1)
    bar.close()
    return rows


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="bench", unit="case")
    except ImportError:
        return _NoBar()


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':14} {'dtype':5} {'T':>6} {'provider':11} {'ms':>10} {'x bound':>8}")
    for r in rows:
        print(f"{r['shape']:14} {r['dtype']:5} {r['tokens']:6d} {r['provider']:11} "
              f"{r['seconds'] * 1e3:10.3f} {r['ratio_to_bound']:8.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 2048])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--strategies", nargs="+", default=["dense", "loop", "grouped", "grouped_mm"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="build/bench")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    rows = bench_cpu(shape, args.tokens, args.dtypes, args.strategies, args.reps, not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "shape": asdict(shape), "reps": args.reps, "rows": rows}
    (out / "cpu.json").write_text(json.dumps(result, indent=2))
    print_table(rows)
    try:
        from .plots import plot_bench_cpu

        plot_bench_cpu(result).savefig(out / "cpu.png", dpi=120, bbox_inches="tight")
        print(f"wrote {out / 'cpu.json'} and {out / 'cpu.png'}")
    except ImportError as e:
        print(f"wrote {out / 'cpu.json'} (no chart: {e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
