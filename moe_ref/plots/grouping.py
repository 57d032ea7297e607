"""Pictures for notebook 03 (token grouping): slots coloured by expert before and after grouping, offsets, sort times.

Legend: T tokens, K top-k, E experts, S = T*K slots (slot s = t*K + k), N grouped rows.
Pure functions: data in, a matplotlib Figure out (matplotlib.figure.Figure, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .naive import expert_colors

__all__ = ["plot_grouping", "plot_sort_times"]


def _strip(ax, experts: list[int], labels: list[str], colors, y: float, annotate: bool) -> None:
    for i, e in enumerate(experts):
        ax.add_patch(Rectangle((i, y), 0.95, 0.9, facecolor=colors[e] if e >= 0 else "white",
                               edgecolor="grey" if e < 0 else "white"))
        if annotate:
            ax.text(i + 0.47, y + 0.45, labels[i], ha="center", va="center", fontsize=6.5)


def plot_grouping(topk_ids: torch.Tensor, plan, title: str | None = None, max_slots: int = 96) -> Figure:
    """Before/after grouping for topk_ids [T, K] and its DispatchPlan (moe_ref.group_by_expert).

    Top: the S slots in token order (t.k labels), coloured by their expert: scattered.
    Middle: the histogram plan.counts [E] and its exclusive prefix sum plan.offsets [E+1].
    Bottom: the N grouped rows (plan.sorted_slots): each expert's assignments contiguous, starting at its offset.
    Only the first `max_slots` slots are drawn; dropped slots (id -1) are white.
    """
    ids = topk_ids.cpu()
    T, K = ids.shape
    E = plan.num_experts
    colors = expert_colors(E)
    flat = ids.reshape(-1).tolist()[:max_slots]  # [S]
    before_labels = [f"{s // K}.{s % K}" for s in range(len(flat))]
    slots = plan.sorted_slots.cpu().tolist()[:max_slots]  # [N]
    after = [int(ids.reshape(-1)[s]) for s in slots]
    after_labels = [f"{s // K}.{s % K}" for s in slots]
    counts, offsets = plan.counts.cpu().tolist(), plan.offsets.cpu().tolist()
    width = max(len(flat), 8)
    annotate = width <= 64
    fig = Figure(figsize=(min(max(10.0, 2 + 0.22 * width), 16), 6.2), layout="constrained")
    ax, hx, bx = fig.subplots(3, 1, gridspec_kw=dict(height_ratios=[1, 1.6, 1]))
    _strip(ax, flat, before_labels, colors, 0, annotate)
    ax.set_title(f"before: {T * K} slots in token order (token.choice), coloured by expert")
    _strip(bx, after, after_labels, colors, 0, annotate)
    bx.set_title("after group_by_expert: each expert's rows contiguous, token order kept inside", pad=12)
    for a in (ax, bx):
        a.set_xlim(0, width)
        a.set_ylim(-0.1, 1.0)
        a.set_yticks([])
        a.set_xlabel("position")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo and lo < width:
            bx.plot([lo, lo], [-0.1, 1.0], color="black", linewidth=1)
            bx.text(lo + 0.05, 0.95, f"E{e}@{lo}", fontsize=7, va="bottom")
    hx.bar(range(E), counts, color=colors)
    for e, c in enumerate(counts):
        hx.text(e, c, f"{c}\noff {offsets[e]}", ha="center", va="bottom", fontsize=7)
    hx.set_ylim(0, max(counts + [1]) * 1.45)
    hx.set_xticks(range(E)) if E <= 32 else None
    hx.set_xlabel("expert")
    hx.set_ylabel("count")
    hx.set_title("counts per expert; off = exclusive prefix sum: expert e owns rows off[e] .. off[e+1]-1")
    if title:
        fig.suptitle(title)
    return fig


def plot_sort_times(tokens: Sequence[int], times: dict[str, Sequence[float]], title: str | None = None) -> Figure:
    """Median seconds to build the plan vs T, one line per method (e.g. {"argsort": [...], "counting": [...]})."""
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for name, secs in times.items():
        ax.plot(list(tokens), [s * 1e3 for s in secs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("ms to build the DispatchPlan")
    ax.set_title(title or "group_by_expert: argsort vs counting sort (CPU)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return fig
