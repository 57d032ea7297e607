"""Pictures for expert parallelism past one node (notebooks 06b and 08): per-rank timelines (Gantt),
inter-node bytes, rank loads before and after replication, and the strategy comparison.

Legend: T tokens, E experts, K top-k, P ranks = N nodes × L ranks per node, M max nodes per token.
Pure functions: data in, a matplotlib Figure out (matplotlib.figure.Figure, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = ["plot_timeline", "plot_inter_node_bytes", "plot_replication_loads", "plot_advice", "plot_multinode_overview",
           "plot_option_sweep"]

_MB_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")


def _gantt(ax, timeline: Mapping, title: str | None):
    events = timeline["events"]
    P = 1 + max((e["rank"] for e in events), default=0)
    for e in events:
        y = 2 * e["rank"] + (0 if e["lane"] == "comm" else 1)
        color = _MB_COLORS[e["micro_batch"] % len(_MB_COLORS)]
        ax.barh(y, (e["end"] - e["start"]) * 1e6, left=e["start"] * 1e6, height=0.8, color=color,
                hatch="//" if e["lane"] == "comm" else None, edgecolor="black", linewidth=0.3,
                alpha=0.6 if e["label"].startswith("combine") else 1.0)
    ax.set_yticks(range(2 * P))
    ax.set_yticklabels([f"r{p} {lane}" for p in range(P) for lane in ("comm", "compute")], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("µs (modeled)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title or f"{timeline['micro_batches']} micro-batch(es): {timeline['total_s'] * 1e6:.1f} µs")


def plot_timeline(timelines, titles: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Gantt chart of one or more layer timelines (moe_ref.parallel.timeline.layer_timeline), one panel each.

    Per rank two lanes: comm (hatched: all-to-all dispatch, combine lighter) and compute (local experts);
    colours are micro-batches. The panels share the time axis.
    """
    tls = [timelines] if isinstance(timelines, Mapping) else list(timelines)
    P = 1 + max(e["rank"] for e in tls[0]["events"])
    fig = Figure(figsize=(8, 0.9 + 0.35 * 2 * P * len(tls)), layout="constrained")
    axes = fig.subplots(len(tls), 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, tl) in enumerate(zip(axes, tls)):
        _gantt(ax, tl, titles[i] if titles else None)
    m = max(tl["micro_batches"] for tl in tls)
    axes[0].legend(handles=[Patch(facecolor=_MB_COLORS[i], label=f"micro-batch {i}") for i in range(m)]
                   + [Patch(facecolor="white", edgecolor="black", hatch="//", label="all-to-all")],
                   fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    return fig


def plot_inter_node_bytes(rows: Sequence[Mapping], x: str = "layer", title: str | None = None) -> Figure:
    """Bars per row of node_limited_row / tiny_node_limited_table: inter-node bytes, flat and hierarchical,
    unrestricted against node-limited."""
    kinds = [("inter_flat_full", "flat, unrestricted", "tab:gray"), ("inter_flat_limited", "flat, node-limited",
             "silver"), ("inter_hier_full", "hierarchical, unrestricted", "tab:blue"),
             ("inter_hier_limited", "hierarchical, node-limited", "tab:green")]
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    w = 0.8 / len(kinds)
    for i, (k, label, color) in enumerate(kinds):
        pos = [j + (i - 1.5) * w for j in range(len(rows))]
        ax.bar(pos, [r[k] / 2**20 for r in rows], w, label=label, color=color)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{x} {r[x]}" + (f"\nerr {r['rel_error']:.2f}" if "rel_error" in r else "") for r in rows],
                       fontsize=8)
    ax.set_ylabel("MiB between nodes (dispatch + combine)")
    ax.legend(fontsize=7)
    ax.set_title(title or "inter-node token bytes")
    return fig


def _load_bars(ax, before, after, title):
    b = torch.as_tensor(before).double()
    a = torch.as_tensor(after).double()
    P = b.numel()
    ax.bar([p - 0.2 for p in range(P)], b.tolist(), 0.4, color="tab:gray", label="contiguous experts")
    ax.bar([p + 0.2 for p in range(P)], a.tolist(), 0.4, color="tab:green", label="replicated + packed")
    mean = float(b.mean()) if P else 0.0
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label="mean")
    ratio = (lambda v: float(v.max() / v.mean()) if float(v.sum()) else 1.0)
    ax.set_title(title or f"max/mean {ratio(b):.2f} -> {ratio(a):.2f}")
    ax.set_xlabel("rank")
    ax.set_ylabel("assignments computed")
    ax.set_xticks(range(P))
    ax.legend(fontsize=7)


def plot_replication_loads(before, after, title: str | None = None) -> Figure:
    """Per-rank loads [P] before (contiguous experts) and after replication and packing, with the mean."""
    fig = Figure(figsize=(5.4, 3.5), layout="constrained")
    _load_bars(fig.subplots(), before, after, title)
    return fig


def plot_advice(cells: Mapping[str, Sequence[Mapping]], metric: str = "layer_us", title: str | None = None) -> Figure:
    """One panel per cell (deployment × workload): horizontal bars of `metric` per option, best on top.

    cells: {cell title: advice rows (moe_ref.advise rows: option, rank, layer_us, tokens_per_s, ok)}; options
    that break a requirement (ok False, e.g. drops under a latency-sensitive workload) are drawn hatched.
    """
    n = len(cells)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig = Figure(figsize=(4.6 * cols, 2.6 * rows_n), layout="constrained")
    axes = fig.subplots(rows_n, cols, squeeze=False).flatten()
    for ax, (name, rows) in zip(axes, cells.items()):
        rows = sorted(rows, key=lambda r: r["rank"], reverse=True)
        vals = [r[metric] for r in rows]
        ax.barh(range(len(rows)), vals, color=["tab:green" if r["rank"] == 1 else "tab:blue" for r in rows],
                hatch=None)
        for i, r in enumerate(rows):
            if not r.get("ok", True):
                ax.barh(i, vals[i], color="white", edgecolor="tab:red", hatch="xx")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["option"] for r in rows], fontsize=7)
        names = {"layer_us": "modeled µs per MoE layer", "tokens_per_s": "tokens/s per layer"}
        ax.set_xlabel(names.get(metric, metric), fontsize=8)
        ax.set_title(name, fontsize=9)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def plot_multinode_overview(inter_bytes: Mapping[str, float], before, after, timelines,
                            title: str | None = None) -> Figure:
    """Three panels: inter-node bytes per scheme ({label: bytes}), rank loads before/after replication, and the
    comm/compute time of each timeline (stacked: busy comm, busy compute, total)."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    labels = list(inter_bytes)
    a.bar(range(len(labels)), [inter_bytes[k] / 2**10 for k in labels], color="tab:blue")
    a.set_xticks(range(len(labels)))
    a.set_xticklabels(labels, fontsize=7, rotation=15)
    a.set_ylabel("KiB between nodes")
    a.set_title("inter-node token bytes (measured)")
    _load_bars(b, before, after, None)
    names = [f"{tl['micro_batches']} micro-batch" for tl in timelines]
    c.bar(range(len(timelines)), [tl["total_s"] * 1e6 for tl in timelines], color="tab:gray", label="layer total")
    c.bar([i - 0.2 for i in range(len(timelines))], [tl["comm_s"] * 1e6 for tl in timelines], 0.3, color="tab:orange",
          label="all-to-all")
    c.bar([i + 0.2 for i in range(len(timelines))], [tl["compute_s"] * 1e6 for tl in timelines], 0.3,
          color="tab:green", label="experts (slowest rank)")
    c.set_xticks(range(len(timelines)))
    c.set_xticklabels(names)
    c.set_ylabel("µs (modeled)")
    c.legend(fontsize=7)
    c.set_title("overlap: modeled layer time")
    if title:
        fig.suptitle(title)
    return fig


def plot_option_sweep(rows: Sequence[Mapping], x: str = "tokens", y: str = "layer_us",
                      title: str | None = None) -> Figure:
    """One line per option: `y` (modeled µs per layer) against `x` (tokens per step or skew); rows of
    moe_ref.advise.option_sweep (x, option, y, ok). Points that break the workload's requirement are hollow."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["option"], []).append(r)
    fig = Figure(figsize=(7.2, 4.0), layout="constrained")
    ax = fig.subplots()
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r[x])
        line = ax.plot([r[x] for r in rs], [r[y] for r in rs], marker="o", label=name)[0]
        bad = [r for r in rs if not r.get("ok", True)]
        if bad:
            ax.plot([r[x] for r in bad], [r[y] for r in bad], "o", markerfacecolor="white",
                    markeredgecolor=line.get_color())
    if x == "tokens":
        ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per step" if x == "tokens" else x)
    ax.set_ylabel("modeled µs per MoE layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or f"options vs {x} (hollow: breaks the workload's drop limit)")
    return fig
