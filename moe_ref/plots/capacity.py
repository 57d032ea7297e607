"""Pictures for notebook 05 (capacity and overflow): load vs capacity, drop share and error vs capacity
factor, and the overflow strategies side by side.

Legend: T tokens, E experts, K top-k, C capacity per expert.
Pure functions: data in, a matplotlib Figure out (matplotlib.figure.Figure, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from matplotlib.figure import Figure

from .naive import expert_colors

__all__ = ["plot_capacity_load", "plot_capacity_sweep", "plot_overflow_comparison"]


def _as_list(v) -> list:
    return v.tolist() if isinstance(v, torch.Tensor) else list(v)


def plot_capacity_load(counts, kept, capacity: int | None, title: str | None = None) -> Figure:
    """Per expert: assignments routed (counts [E]) split into kept (kept [E], coloured) and overflow (red hatch),
    with the capacity line C. For reroute, kept can exceed the routed count (assignments moved in)."""
    c, k = _as_list(counts), _as_list(kept)
    E = len(c)
    fig = Figure(figsize=(min(4 + 0.45 * E, 12), 3.6), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(E), k, color=expert_colors(E), label="computed (kept or moved in)")
    over = [max(ci - ki, 0) for ci, ki in zip(c, k)]
    ax.bar(range(E), over, bottom=k, color="white", edgecolor="tab:red", hatch="///", label="overflow (not kept here)")
    if capacity is not None:
        ax.axhline(capacity, color="tab:red", linewidth=1.5, label=f"capacity C = {capacity}")
    ax.axhline(sum(c) / E if E else 0, color="black", linestyle="--", linewidth=1, label="even share")
    ax.set_xlabel("expert")
    ax.set_ylabel("assignments")
    if E <= 32:
        ax.set_xticks(range(E))
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or "expert load vs capacity")
    return fig


def plot_capacity_sweep(rows: Sequence[Mapping], series: str | Sequence[str] = "skew", title: str | None = None
                        ) -> Figure:
    """Drop share (left) and relative output error vs dropless (right) against the capacity factor.

    rows: moe_ref.capacity_quality_table rows (capacity_factor, drop_share, rel_error, and the series keys);
    one line per distinct value of `series` (a key or a tuple of keys, e.g. ("skew", "overflow")).
    """
    keys = (series,) if isinstance(series, str) else tuple(series)
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    for g, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["capacity_factor"])
        label = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in zip(keys, g))
        cf = [r["capacity_factor"] for r in rs]
        ax.plot(cf, [100 * r["drop_share"] for r in rs], marker="o", label=label)
        bx.plot(cf, [r["rel_error"] for r in rs], marker="o", label=label)
    ax.set_xlabel("capacity factor")
    ax.set_ylabel("assignments dropped (%)")
    ax.set_title("drop share")
    bx.set_xlabel("capacity factor")
    bx.set_ylabel("||y - y_dropless|| / ||y_dropless||")
    bx.set_title("output error vs dropless")
    for a in (ax, bx):
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def plot_overflow_comparison(rows: Sequence[Mapping], title: str | None = None) -> Figure:
    """The overflow strategies side by side: output error vs dropless, expert rows computed (useful vs padding)
    and passes, and wall time. rows: dicts with overflow, rel_error, computed_rows, padded_slots, passes,
    seconds, and error (the message when the strategy raised; its bars are left empty)."""
    names = [r["overflow"] for r in rows]
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax, bx, cx = fig.subplots(1, 3)
    x = range(len(names))
    ok = [r.get("error") is None for r in rows]
    ax.bar(x, [r["rel_error"] if o else 0 for r, o in zip(rows, ok)], color="tab:red")
    useful = [r["computed_rows"] - r["padded_slots"] if o else 0 for r, o in zip(rows, ok)]
    pad = [r["padded_slots"] if o else 0 for r, o in zip(rows, ok)]
    bx.bar(x, useful, color="tab:blue", label="useful rows")
    bx.bar(x, pad, bottom=useful, color="lightgrey", hatch="//", label="padding rows")
    cx.bar(x, [r["seconds"] * 1e3 if o else 0 for r, o in zip(rows, ok)], color="tab:green")
    for i, (r, o) in enumerate(zip(rows, ok)):
        if not o:
            for a in (ax, bx, cx):
                a.text(i, 0, "raised\nValueError", ha="center", va="bottom", fontsize=7, color="tab:red")
        else:
            ax.text(i, r["rel_error"], f"{r['rel_error']:.3f}", ha="center", va="bottom", fontsize=7)
            bx.text(i, r["computed_rows"], f"{r['passes']} pass" + ("es" if r["passes"] > 1 else ""),
                    ha="center", va="bottom", fontsize=7)
    for a, lab, t in ((ax, "||y - y_dropless|| / ||y_dropless||", "output error"),
                      (bx, "expert rows computed", "work (static [E, C, D] buffers)"),
                      (cx, "median ms", "wall time (CPU)")):
        a.set_xticks(list(x), names, rotation=20)
        a.set_ylabel(lab)
        a.set_title(t)
    bx.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig
