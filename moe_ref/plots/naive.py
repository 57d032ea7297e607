"""Pictures for notebook 01 (naive batching): the router's choices, per-expert loads, wasted work, timings.

Legend: T tokens, E experts, K top-k.
Pure functions: data in, a matplotlib Figure out (built with matplotlib.figure.Figure, not pyplot, so
nothing is registered globally, a notebook shows each figure once, and there is nothing to close).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

__all__ = ["expert_colors", "plot_router_choices", "plot_expert_load", "plot_naive_work", "plot_strategy_times"]


def expert_colors(num_experts: int) -> list:
    """One colour per expert (tab10 up to 10 experts, tab20 up to 20, then a continuous map)."""
    if num_experts <= 10:
        cmap = plt.get_cmap("tab10")
        return [cmap(e) for e in range(num_experts)]
    if num_experts <= 20:
        cmap = plt.get_cmap("tab20")
        return [cmap(e) for e in range(num_experts)]
    cmap = plt.get_cmap("turbo")
    return [cmap(e / max(num_experts - 1, 1)) for e in range(num_experts)]


def _as_list(v) -> list:
    return v.tolist() if isinstance(v, torch.Tensor) else list(v)


def plot_router_choices(probs: torch.Tensor, topk_ids: torch.Tensor, title: str | None = None) -> Figure:
    """Heatmap of router probabilities probs [T, E] with each token's K chosen experts boxed (topk_ids [T, K])."""
    P = probs.detach().double().cpu()  # [T, E]
    ids = topk_ids.cpu()  # [T, K]
    T, E = P.shape
    fig = Figure(figsize=(min(2.5 + 0.45 * E, 12), min(1.5 + 0.3 * T, 9)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(P.numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=max(float(P.max()), 1e-9) if T else 1)
    for t in range(T):
        for k, e in enumerate(ids[t].tolist()):
            if e >= 0:
                ax.add_patch(_box(e, t, "tab:red" if k == 0 else "tab:orange"))
    ax.set_xticks(range(E))
    ax.set_xlabel("expert")
    ax.set_ylabel("token")
    ax.set_title(title or f"router probabilities; boxes = top-{ids.shape[1]} choice (red 1st, orange later)")
    fig.colorbar(im, ax=ax, label="softmax probability")
    return fig


def _box(e: int, t: int, color):
    from matplotlib.patches import Rectangle

    return Rectangle((e - 0.5, t - 0.5), 1, 1, fill=False, edgecolor=color, linewidth=2)


def plot_expert_load(counts, title: str | None = None, capacity: int | None = None, ax=None) -> Figure:
    """Bar chart of assignments per expert counts [E], with the mean (even share) and an optional capacity line."""
    c = _as_list(counts)
    E = len(c)
    if ax is None:
        fig = Figure(figsize=(min(3 + 0.4 * E, 12), 3.2), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    ax.bar(range(E), c, color=expert_colors(E))
    mean = sum(c) / E if E else 0.0
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"even share {mean:.1f}")
    if capacity is not None:
        ax.axhline(capacity, color="tab:red", linewidth=1.5, label=f"capacity C = {capacity}")
    ax.set_xlabel("expert")
    ax.set_ylabel("assignments")
    if E <= 32:
        ax.set_xticks(range(E))
    imb = max(c) / mean if mean else 1.0
    ax.set_title(title or f"expert load (max/mean = {imb:.2f})")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def plot_naive_work(counts, num_tokens: int, top_k: int, title: str | None = None) -> Figure:
    """Why naive batching wastes work, from one routing's per-expert loads counts [E].

    Left: the batch each expert gets in the "loop" strategy (tiny and irregular; one GEMM each).
    Right: expert rows computed per strategy: "dense" runs every token through every expert (T*E rows),
    "loop"/"grouped" only the T*K routed ones; the grey part of dense is wasted (1 - K/E).
    """
    c = _as_list(counts)
    E, T, K = len(c), int(num_tokens), int(top_k)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax, bx = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[3, 2]))
    plot_expert_load(c, ax=ax, title=f"loop: {E} separate GEMMs of {min(c)}..{max(c)} rows (T={T}, K={K})")
    ax.title.set_fontsize(10)
    useful = T * K
    dense = T * E
    bx.bar(["dense", "loop / grouped"], [useful, useful], color="tab:blue", label="useful rows (T*K)")
    bx.bar(["dense"], [dense - useful], bottom=[useful], color="lightgrey", hatch="//",
           label="wasted rows (masked out)")
    waste = 1 - useful / dense if dense else 0.0
    bx.set_ylabel("token rows through an expert FFN")
    bx.set_title(f"dense: E/K = {E / K:.1f}x the work, {waste:.0%} wasted", fontsize=10)
    bx.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_strategy_times(times: Mapping[str, float], bound_key: str = "gemm_only", title: str | None = None) -> Figure:
    """Horizontal bars of wall time per provider (seconds), annotated with the ratio to the GEMM-only bound."""
    names: Sequence[str] = list(times)
    secs = [float(times[n]) for n in names]
    bound = float(times[bound_key]) if bound_key in times else None
    fig = Figure(figsize=(8, 0.6 + 0.55 * len(names)), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:green" if n == bound_key else "tab:blue" for n in names]
    ax.barh(range(len(names)), [s * 1e3 for s in secs], color=colors)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    for i, s in enumerate(secs):
        label = f"{s * 1e3:.2f} ms" + (f"  ({s / bound:.1f}x bound)" if bound else "")
        ax.text(s * 1e3, i, " " + label, va="center", fontsize=8)
    ax.set_xlim(0, max(secs) * 1e3 * 1.45 if secs else 1)
    ax.set_xlabel("median wall time (ms)")
    ax.set_title(title or "time per forward vs the GEMM-only bound (green)")
    return fig
