"""Pictures for notebook 06 (expert parallelism): the all-to-all traffic matrix, per-rank load, imbalance vs
batch size and skew, and naive vs grouped communication volume.

Legend: T tokens, E experts, K top-k, C capacity per expert, P ranks, El = E / P.
Pure functions: data in, a matplotlib Figure out (matplotlib.figure.Figure, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from matplotlib.figure import Figure

__all__ = ["plot_traffic_matrix", "plot_rank_load", "plot_ep_imbalance_sweep", "plot_comm_volume",
           "plot_ep_overview"]


def _as_list(v) -> list:
    return v.tolist() if isinstance(v, torch.Tensor) else list(v)


def _traffic(ax, traffic, unit: str, title: str):
    m = torch.as_tensor(traffic).double()
    P = m.shape[0]
    im = ax.imshow(m.numpy(), cmap="Blues", vmin=0)
    hi = float(m.max()) if m.numel() else 0.0
    for p in range(P):
        for q in range(P):
            v = float(m[p, q])
            txt = f"{v:.0f}" if unit == "rows" else f"{v / 1024:.0f}K"
            if P <= 8:
                ax.text(q, p, txt, ha="center", va="center", fontsize=8,
                        color="white" if hi and v > 0.6 * hi else "black")
    ax.set_xlabel("to rank q (expert owner)")
    ax.set_ylabel("from rank p (token owner)")
    ax.set_xticks(range(P))
    ax.set_yticks(range(P))
    ax.set_title(title)
    return im


def plot_traffic_matrix(traffic, unit: str = "rows", title: str | None = None) -> Figure:
    """Heatmap of the all-to-all dispatch traffic [P, P]: entry (p, q) = rows (or bytes) rank p sends to rank q.

    The diagonal stays on its rank (a local copy); everything else crosses a link, twice (the combine sends
    the results back along the transpose).
    """
    fig = Figure(figsize=(4.6, 3.9), layout="constrained")
    ax = fig.subplots()
    im = _traffic(ax, traffic, unit, title or f"all-to-all dispatch traffic ({unit})")
    fig.colorbar(im, ax=ax, label=unit)
    return fig


def _load(ax, rank_load, limit, title, passes: int = 1):
    load = _as_list(rank_load)
    P = len(load)
    mean = sum(load) / P if P else 0.0
    ax.bar(range(P), load, color=["tab:red" if v == max(load) and v > mean else "tab:blue" for v in load])
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label="mean (even split)")
    if limit is not None:
        ax.axhline(limit, color="tab:red", linewidth=1.5,
                   label=f"capacity bound (E/P)·C = {limit}" if passes == 1 else
                   f"capacity bound (E/P)·C·passes = {limit}")
    ax.set_xticks(range(P))
    ax.set_xlabel("rank")
    ax.set_ylabel("expert rows computed")
    imb = max(load) / mean if mean else 1.0
    ax.set_title(title or f"per-rank load, imbalance max/mean = {imb:.2f}")
    ax.legend(fontsize=7, loc="upper right")


def plot_rank_load(rank_load, limit: int | None = None, title: str | None = None, passes: int = 1) -> Figure:
    """Bars of expert rows computed per rank [P] with the mean and, under capacity, the bound `limit`.

    limit: at most (E/P)·C rows per rank per pass (each rank owns E/P experts of capacity C), times `passes`.
    """
    fig = Figure(figsize=(4.8, 3.4), layout="constrained")
    _load(fig.subplots(), rank_load, limit, title, passes)
    return fig


def plot_ep_imbalance_sweep(rows: Sequence[Mapping], x: str = "tokens", series: str = "skew",
                            y: str = "imbalance", title: str | None = None) -> Figure:
    """One line per value of `series`: `y` (default max/mean per-rank load, mean over trials) against `x`.

    rows: dicts with keys x, series, y (and optionally y + "_max" for a shaded band up to the worst trial).
    """
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[series], []).append(r)
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.subplots()
    for g, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r[x])
        xs = [r[x] for r in rs]
        line = ax.plot(xs, [r[y] for r in rs], marker="o", label=f"{series}={g:g}" if isinstance(g, float)
                       else f"{series}={g}")[0]
        if all(f"{y}_max" in r for r in rs):
            ax.fill_between(xs, [r[y] for r in rs], [r[f"{y}_max"] for r in rs], color=line.get_color(), alpha=0.15)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    if x == "tokens":
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel("max / mean rows per rank" if y == "imbalance" else y)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"per-rank load imbalance vs {x}")
    return fig


def plot_comm_volume(rows: Sequence[Mapping], x: str = "world_size", title: str | None = None) -> Figure:
    """Grouped bars of bytes crossing links per forward: naive vs grouped all-to-all (vs deduplicated per rank).

    rows: dicts with key x and byte counts "naive", "grouped" and optionally "dedup".
    """
    rows = sorted(rows, key=lambda r: r[x])
    kinds = [k for k in ("naive", "grouped", "dedup") if all(k in r for r in rows)]
    labels = {"naive": "naive: all-gather tokens + reduce-scatter", "grouped": "grouped all_to_all (per assignment)",
              "dedup": "all_to_all, one row per destination rank"}
    colors = {"naive": "tab:gray", "grouped": "tab:blue", "dedup": "tab:green"}
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(kinds), 1)
    for i, k in enumerate(kinds):
        pos = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(pos, [r[k] / 2**20 for r in rows], width, label=labels[k], color=colors[k])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{x}={r[x]:g}" if isinstance(r[x], float) else f"{x}={r[x]}" for r in rows])
    ax.set_ylabel("MiB across links per forward")
    ax.legend(fontsize=7)
    ax.set_title(title or "communication volume: naive vs grouped")
    return fig


def plot_ep_overview(traffic_rows, rank_load, naive_bytes: int, grouped_bytes: int, limit: int | None = None,
                     title: str | None = None, passes: int = 1) -> Figure:
    """Three panels for one forward: traffic matrix (rows), per-rank load, and naive vs grouped link bytes.

    limit: the per-rank capacity bound (E/P)·C·passes, or None without capacity.
    """
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    _traffic(a, traffic_rows, "rows", "dispatch rows p -> q")
    _load(b, rank_load, limit, None, passes)
    c.bar(["naive", "grouped"], [naive_bytes / 2**10, grouped_bytes / 2**10], color=["tab:gray", "tab:blue"])
    ratio = grouped_bytes / naive_bytes if naive_bytes else float("nan")
    c.set_ylabel("KiB across links")
    c.set_title(f"link bytes: grouped / naive = {ratio:.2f}")
    if title:
        fig.suptitle(title)
    return fig
