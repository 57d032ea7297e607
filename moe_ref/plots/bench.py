"""Charts of benchmark results (JSON written by moe_ref.bench)."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["plot_bench_cpu"]


def plot_bench_cpu(result: dict) -> Figure:
    """Bar chart of milliseconds per provider, one panel per (dtype, T), with the GEMM-only bound marked."""
    rows = result["rows"]
    cases = sorted({(r["dtype"], r["tokens"]) for r in rows}, key=lambda c: (c[0], c[1]))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6), squeeze=False)
    for ax, (dt, T) in zip(axes[0], cases):
        sel = [r for r in rows if r["dtype"] == dt and r["tokens"] == T]
        names = [r["provider"] for r in sel]
        ms = [r["seconds"] * 1e3 for r in sel]
        colors = ["#888888" if n == "gemm_only" else "#3b75af" for n in names]
        ax.bar(names, ms, color=colors)
        for i, r in enumerate(sel):
            ax.text(i, ms[i], f"{r['ratio_to_bound']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{dt}, T={T}")
        ax.set_ylabel("ms (median)")
        ax.tick_params(axis="x", rotation=35)
    m = result["machine"]
    fig.suptitle(f"{result['shape']['name']} on {m['device']} — torch {m['torch']}, {m['date'][:10]}", fontsize=9)
    fig.tight_layout()
    return fig
