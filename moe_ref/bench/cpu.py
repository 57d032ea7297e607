"""The CPU benchmark: every strategy side by side, against the GEMM-only bound, timed interleaved.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
The GEMM-only bound does just the per-expert SwiGLU GEMMs on rows already grouped by expert (the same
expert loads as the routing; no routing, permutation or combine): what any strategy must at least spend.
All providers of one (dtype, T) are timed round by round (timing.time_cpu), so a busy moment of the
machine hits them alike; each row keeps the median and the interquartile range, with the thread count.
A result faster than its own bound, or with a spread over 25 % of its median, is flagged (`warning`).
"""

from __future__ import annotations

import torch

from ..config import MoEConfig
from ..layer import MoELayer
from ..reference import swiglu
from .shapes import DTYPES, Shape
from .timing import progress, time_cpu

__all__ = ["bench_cpu", "gemm_only", "print_table", "CPU_STRATEGIES"]

CPU_STRATEGIES = ("dense", "loop", "grouped", "grouped_mm")
WIDE_SPREAD = 0.25  # iqr / median above which a row is flagged


def gemm_only(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor):
    """A callable doing just the per-expert GEMMs (+SwiGLU) on pre-grouped rows: the compute bound."""
    blocks = [x.new_empty(n, x.shape[1]).normal_() for n in counts]  # [n_e, D] per expert

    def run():
        for e, xb in enumerate(blocks):
            if xb.shape[0]:
                swiglu(xb @ w13[e].t()) @ w2[e].t()

    return run


def _warning(name: str, t: dict, bound: dict) -> str | None:
    if name != "gemm_only" and t["median_s"] < bound["median_s"] * 0.98:
        return f"faster than its own bound ({t['median_s'] / bound['median_s']:.2f}x): distrust this row"
    if t["iqr_s"] > WIDE_SPREAD * t["median_s"]:
        return f"wide spread (IQR {100 * t['iqr_s'] / t['median_s']:.0f} % of the median): a busy machine?"
    return None


def bench_cpu(shape: Shape, token_counts, dtypes, strategies=CPU_STRATEGIES, reps: int = 5,
              progress_bar: bool = True) -> list[dict]:
    """Rows {shape, dtype, tokens, provider, seconds (median), iqr_s, ratio_to_bound, threads, warning?}."""
    cfg = MoEConfig(shape.d_model, shape.d_ff, shape.num_experts, shape.top_k)
    jobs = [(dt, T) for dt in dtypes for T in token_counts]
    bar = progress(len(jobs), progress_bar, desc="bench cpu")
    rows = []
    for dt_name, T in jobs:
        dtype = DTYPES[dt_name]
        layer = MoELayer(cfg, dtype=dtype, seed=0)
        x = torch.randn(T, shape.d_model, generator=torch.Generator().manual_seed(1)).to(dtype)  # [T, D]
        with torch.inference_mode():
            r = layer.route(x)
            counts = torch.bincount(r.topk_ids.reshape(-1), minlength=shape.num_experts).tolist()
            fns = {"gemm_only": gemm_only(x, counts, layer.w13, layer.w2)}
            fns.update({s: (lambda s=s, L=layer, x=x, r=r: L(x, strategy=s, routing=r)) for s in strategies})
            times = time_cpu(fns, rounds=reps)
        bound = times["gemm_only"]
        for name, t in times.items():
            row = dict(shape=shape.name, dtype=dt_name, tokens=T, provider=name, seconds=t["median_s"],
                       iqr_s=t["iqr_s"], ratio_to_bound=t["median_s"] / bound["median_s"],
                       threads=torch.get_num_threads())
            warn = _warning(name, t, bound)
            if warn:
                row["warning"] = warn
            rows.append(row)
        bar.update(1)
    bar.close()
    return rows


def print_table(rows: list[dict]) -> None:
    """One line per row: ms (median +- IQR/2) and the ratio to the GEMM-only bound."""
    print(f"{'shape':14} {'dtype':5} {'T':>6} {'provider':11} {'ms':>10} {'+-':>7} {'x bound':>8}")
    for r in rows:
        print(f"{r['shape']:14} {r['dtype']:5} {r['tokens']:6d} {r['provider']:11} "
              f"{r['seconds'] * 1e3:10.3f} {r.get('iqr_s', 0.0) * 5e2:7.3f} {r['ratio_to_bound']:8.2f}"
              + (f"  ! {r['warning']}" if r.get("warning") else ""))
