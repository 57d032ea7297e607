"""Pictures for notebook 04 (permutation): the token-flow diagram of a real batch, and per-stage times.

Legend: T tokens, K top-k, E experts, N grouped rows (kept assignments), slot s = t*K + k.
Pure functions: data in, a matplotlib Figure out (matplotlib.figure.Figure, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

from .naive import expert_colors

__all__ = ["plot_token_flow", "plot_stage_times", "OVERHEAD_STAGES"]

# stages that move or index data rather than compute expert FFNs (coloured as overhead)
OVERHEAD_STAGES = ("group", "permute", "unpermute + combine")


def plot_token_flow(topk_ids: torch.Tensor, topk_weights: torch.Tensor, plan, title: str | None = None) -> Figure:
    """The token-flow figure of the permutation workflow, drawn from an actual batch.

    Left column: input tokens x_t in batch order. Lines (coloured by expert) = permute: each token is
    copied once per chosen expert into the grouped buffer (middle), where each expert's rows form one
    contiguous block that a single GEMM pair processes. Right lines = unpermute + weighted combine:
    y_t = sum_k w[t, k] * expert_out[row of (t, k)], line width ∝ the gate weight w[t, k]; for up to 12 tokens
    the weights are also written right of each y_t, one line per choice k.
    topk_ids/topk_weights [T, K]; plan: the DispatchPlan of topk_ids.
    """
    ids, w = topk_ids.cpu(), topk_weights.detach().float().cpu()
    T, K = ids.shape
    E, N = plan.num_experts, plan.num_rows
    colors = expert_colors(E)
    inverse = plan.inverse.cpu().tolist()  # [S]
    offsets = plan.offsets.cpu().tolist()
    H = max(T, N, 1)
    height = min(2.2 + 0.32 * H, 14)
    fig = Figure(figsize=(11, height), layout="constrained")
    ax = fig.subplots()
    per_unit = height * 72 * 0.85 / (H + 3.4)  # points per data unit of height (the axes span about 85 %)
    line_pt = min(9.0, H / max(T, 1) * per_unit / max(K, 1))  # K weight labels share one token's height
    font, dy = min(6.5, 0.75 * line_pt), line_pt / per_unit

    def y_tok(t):  # tokens spread over the height of the grouped column
        return (H - 1) - (t + 0.5) * H / max(T, 1) + 0.5

    def y_row(i):
        return (H - 1) - i

    xl, xm, xr = 0.0, 4.0, 8.0
    for t in range(T):
        for k in range(K):
            i = inverse[t * K + k]
            if i < 0:
                continue
            e = int(ids[t, k])
            ax.plot([xl + 0.6, xm - 0.7], [y_tok(t), y_row(i)], color=colors[e], linewidth=1.2, alpha=0.8)
            ax.plot([xm + 0.7, xr - 0.6], [y_row(i), y_tok(t)], color=colors[e],
                    linewidth=0.5 + 3.5 * float(w[t, k]), alpha=0.7)
            if T <= 12:  # gate weights stacked right of y_t, one line per choice: they never overlap
                ax.text(xr + 0.65, y_tok(t) + ((K - 1) / 2 - k) * dy, f"w{k}={float(w[t, k]):.2f} (expert {e})",
                        fontsize=font, color=colors[e], ha="left", va="center")
    for t in range(T):
        for x0, name in ((xl, "x"), (xr, "y")):
            ax.add_patch(FancyBboxPatch((x0 - 0.55, y_tok(t) - 0.35), 1.1, 0.7, boxstyle="round,pad=0.02",
                                        facecolor="whitesmoke", edgecolor="black", linewidth=0.6))
            ax.text(x0, y_tok(t), f"{name}{t}", ha="center", va="center", fontsize=7)
    sorted_slots = plan.sorted_slots.cpu().tolist()
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if hi <= lo:
            continue
        ax.add_patch(Rectangle((xm - 0.7, y_row(hi - 1) - 0.45), 1.4, hi - lo - 0.1, facecolor=colors[e],
                               alpha=0.25, edgecolor=colors[e], linewidth=1.5))
        ax.text(xm + 0.75, (y_row(lo) + y_row(hi - 1)) / 2, f"expert {e}\n{hi - lo} rows\n1 GEMM pair", ha="left",
                va="center", fontsize=7, color=colors[e], fontweight="bold",
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
        for i in range(lo, hi):
            s = sorted_slots[i]
            ax.text(xm, y_row(i), f"row {i} = x{s // K} (choice {s % K})", ha="center", va="center", fontsize=6.5)
    ax.text(xl, H + 0.3, "tokens (batch order)", ha="center", fontsize=8, fontweight="bold")
    ax.text(xm, H + 0.3, "permuted buffer, grouped by expert", ha="center", fontsize=8, fontweight="bold")
    ax.text(xr, H + 0.3, "output (weighted combine)", ha="center", fontsize=8, fontweight="bold")
    ax.text((xl + xm) / 2, -1.3, "route + group + permute (copy)", ha="center", fontsize=8)
    ax.text((xm + xr) / 2, -1.3, "unpermute + combine (line width = gate weight)", ha="center", fontsize=8)
    ax.set_xlim(-1, 10.6)
    ax.set_ylim(-1.8, H + 1.6)
    ax.axis("off")
    ax.set_title(title or f"token flow of a real batch: T={T}, K={K}, E={E}, N={N} grouped rows")
    return fig


def plot_stage_times(times: Mapping[str, float], title: str | None = None) -> Figure:
    """Bars of median seconds per pipeline stage, overhead stages (OVERHEAD_STAGES) in orange, with % of total."""
    names = list(times)
    secs = [float(times[n]) for n in names]
    total = sum(secs) or 1.0
    fig = Figure(figsize=(8, 0.8 + 0.5 * len(names)), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:orange" if n in OVERHEAD_STAGES else ("tab:blue" if "expert" in n else "tab:gray") for n in names]
    ax.barh(range(len(names)), [s * 1e3 for s in secs], color=colors)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    for i, s in enumerate(secs):
        ax.text(s * 1e3, i, f" {s * 1e3:.3f} ms ({s / total:.0%})", va="center", fontsize=8)
    ax.set_xlim(0, max(secs + [1e-9]) * 1e3 * 1.4)
    ax.set_xlabel("median wall time (ms)")
    over = sum(s for n, s in zip(names, secs) if n in OVERHEAD_STAGES)
    ax.set_title(title or f"time per stage: data movement + index math (orange) = {over / total:.0%} of the total")
    return fig
