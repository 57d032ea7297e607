"""Pictures for notebook 02 (dynamic batching): a simulated serving timeline, latency vs throughput,
expert-load imbalance vs batch size.

Legend: T tokens in a batch, E experts, K top-k.
Pure functions: data in, a matplotlib Figure out (matplotlib.figure.Figure, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = ["plot_batching_timeline", "plot_latency_throughput", "plot_imbalance_vs_batch"]


def plot_batching_timeline(sim, max_batches: int = 40, title: str | None = None) -> Figure:
    """A moe_ref.BatchingSimulation over time: requests arriving (ticks), batches (boxes, height = tokens,
    green = flushed full, orange = flushed by max_wait), and each batch's expert-load imbalance (max/mean).

    Only the first `max_batches` batches are drawn; the title then says how many of how many.
    """
    batches = sim.batches[:max_batches]
    t_end = batches[-1]["end"] if batches else 1.0
    fig = Figure(figsize=(11, 5), layout="constrained")
    ax, bx = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=[2, 1]))
    arr = [a for a in sim.arrivals if a <= t_end]
    ax.plot([a * 1e3 for a in arr], [-0.05 * max(b["num_tokens"] for b in batches)] * len(arr) if batches else [],
            "|", color="black", markersize=8, label="request arrives")
    for b in batches:
        color = "tab:green" if b["reason"] == "full" else "tab:orange"
        ax.add_patch(Rectangle((b["start"] * 1e3, 0), (b["end"] - b["start"]) * 1e3, b["num_tokens"],
                               facecolor=color, alpha=0.6, edgecolor="black", linewidth=0.5))
    ax.plot([], [], "s", color="tab:green", alpha=0.6, label="batch flushed full (max_batch_tokens)")
    ax.plot([], [], "s", color="tab:orange", alpha=0.6, label="batch flushed by max_wait")
    top = max([b["num_tokens"] for b in batches] + [1])
    ax.set_ylim(-0.12 * top, top * 1.25)
    ax.set_ylabel("tokens in the batch")
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    p = sim.params
    shown = "" if len(sim.batches) <= max_batches else f"\n(first {len(batches)} of {len(sim.batches)} batches shown)"
    ax.set_title((title or f"simulated serving: {p['arrival_rate']:g} req/s, max_batch_tokens={p['max_batch_tokens']}, "
                           f"max_wait={p['max_wait'] * 1e3:g} ms; p50 latency {sim.p50_latency_s * 1e3:.2f} ms, "
                           f"p99 {sim.p99_latency_s * 1e3:.2f} ms") + shown)
    bx.bar([(b["start"] + b["end"]) / 2 * 1e3 for b in batches], [b["load_imbalance"] for b in batches],
           width=[max((b["end"] - b["start"]) * 1e3, 1e-3) for b in batches], color="tab:purple", alpha=0.7)
    bx.axhline(1.0, color="black", linestyle="--", linewidth=1)
    bx.set_ylabel("max/mean\nexpert load")
    bx.set_xlabel("time (ms)")
    bx.set_xlim(0, t_end * 1e3 * 1.02)
    return fig


def plot_latency_throughput(rows: Sequence[Mapping], title: str | None = None) -> Figure:
    """Latency and throughput vs max_wait, one line per max_batch_tokens.

    rows: dicts with max_wait (s), max_batch_tokens, p50_latency_s, p99_latency_s, throughput_tokens_per_s.
    """
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    for mbt in sorted({r["max_batch_tokens"] for r in rows}):
        rs = sorted((r for r in rows if r["max_batch_tokens"] == mbt), key=lambda r: r["max_wait"])
        xs = [r["max_wait"] * 1e3 for r in rs]
        line = ax.plot(xs, [r["p99_latency_s"] * 1e3 for r in rs], marker="o", label=f"p99, max_batch_tokens={mbt}")
        ax.plot(xs, [r["p50_latency_s"] * 1e3 for r in rs], marker=".", linestyle=":", color=line[0].get_color())
        bx.plot(xs, [r["throughput_tokens_per_s"] for r in rs], marker="o", label=f"max_batch_tokens={mbt}")
    ax.set_xlabel("max_wait (ms)")
    ax.set_ylabel("request latency (ms): p99 solid, p50 dotted")
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("latency")
    bx.set_xlabel("max_wait (ms)")
    bx.set_ylabel("served tokens / s")
    bx.set_title("throughput")
    bx.legend(fontsize=7)
    for a in (ax, bx):
        a.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_imbalance_vs_batch(samples: Mapping[int, Sequence[float]], title: str | None = None) -> Figure:
    """Expert-load imbalance (max/mean) vs batch size: every sample as a dot, the median and worst as lines.

    samples: {tokens in the batch: [max/mean of one random batch, ...]}.
    """
    sizes = sorted(samples)
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    for T in sizes:
        ys = list(samples[T])
        ax.plot([T] * len(ys), ys, ".", color="tab:blue", alpha=0.25)
    med = [sorted(samples[T])[len(samples[T]) // 2] for T in sizes]
    worst = [max(samples[T]) for T in sizes]
    ax.plot(sizes, med, marker="o", color="tab:blue", label="median batch")
    ax.plot(sizes, worst, marker="v", color="tab:red", label="worst batch seen")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="perfectly even")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the batch")
    ax.set_ylabel("max / mean expert load")
    ax.set_title(title or "bigger batches even out expert load on average, but guarantee nothing")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return fig
