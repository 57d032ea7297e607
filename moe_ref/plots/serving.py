"""Pictures for notebook 02b (continuous batching): experts touched vs tokens, the cost model's knee for MoE vs
dense, continuous vs request-level serving, chunked prefill, the cost model against measurement, a real serving loop.

Legend: T tokens in a step, E experts, K top-k, H distinct experts a step touches, B token budget.
Pure functions: data in, a matplotlib Figure out (matplotlib.figure.Figure, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure

__all__ = ["plot_experts_touched", "plot_cost_knee", "plot_serving_comparison", "plot_chunked_prefill",
           "plot_cost_validation", "plot_serving_steps", "draw_experts_touched", "draw_cost_knee",
           "draw_serving_comparison"]


def draw_experts_touched(ax, curve: Sequence[Mapping], points: Sequence[Mapping] = (), label: str = "") -> None:
    """On ax: the closed form E[H] vs T (curve: dicts tokens, hit) and measured points (dicts tokens, hit, label)."""
    ax.plot([r["tokens"] for r in curve], [r["hit"] for r in curve], color="black",
            label=label or "closed form E(1-(1-K/E)^T)")
    for lab in dict.fromkeys(p.get("label", "measured") for p in points):
        ps = [p for p in points if p.get("label", "measured") == lab]
        ax.plot([p["tokens"] for p in ps], [p["hit"] for p in ps], "o", alpha=0.6, markersize=4, label=lab)
    ax.set_xscale("log")
    ax.set_xlabel("tokens in the step (T)")
    ax.set_ylabel("experts touched (H)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot_experts_touched(curve: Sequence[Mapping], points: Sequence[Mapping] = (), title: str | None = None) -> Figure:
    """Experts touched vs tokens in a step: the closed form and simulated or measured points."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    draw_experts_touched(fig.subplots(), curve, points)
    fig.suptitle(title or "experts a step touches")
    return fig


def draw_cost_knee(ax, moe: Sequence[Mapping], dense: Sequence[Mapping], knees: Mapping | None = None) -> None:
    """On ax: time per token (µs) vs T for MoE and dense rows (costmodel.step_cost dicts); knees {label: T*}."""
    for rows, label, color in ((moe, "MoE", "tab:blue"), (dense, "dense, same active params", "tab:orange")):
        ax.plot([r["tokens"] for r in rows], [r["time_s"] / r["tokens"] * 1e6 for r in rows], color=color,
                label=label)
    for (label, T), color in zip((knees or {}).items(), ("tab:blue", "tab:orange")):
        ax.axvline(T, color=color, linestyle=":", linewidth=1)
        ax.annotate(f"{label} knee T*={T:.0f}", (T, 1), fontsize=7, color=color,
                    xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the step (T)")
    ax.set_ylabel("µs per token (one layer)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def plot_cost_knee(moe: Sequence[Mapping], dense: Sequence[Mapping], knees: Mapping | None = None,
                   title: str | None = None) -> Figure:
    """Time per token vs T: memory-bound (falling) until the knee, compute-bound (flat) after; MoE vs dense."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    draw_cost_knee(fig.subplots(), moe, dense, knees)
    fig.suptitle(title or "cost per token: the knee")
    return fig


_METRICS = (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"), ("itl_p50_s", "ITL p50"), ("itl_p99_s", "ITL p99"))


def draw_serving_comparison(ax, bx, rows: Sequence[Mapping]) -> None:
    """On ax: latency metrics (ms, log) per row; on bx: throughput per row. rows: dicts with mode, model, metrics."""
    labels = [f"{r['mode']}\n{r['model']}" for r in rows]
    width = 0.8 / len(_METRICS)
    for j, (key, name) in enumerate(_METRICS):
        ax.bar([i + j * width for i in range(len(rows))], [max(r[key] * 1e3, 1e-6) for r in rows], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)
    ax.set_title("latency")
    bx.bar(range(len(rows)), [r["throughput_tokens_per_s"] for r in rows], color="tab:green")
    bx.set_xticks(range(len(rows)), labels, fontsize=7)
    bx.set_ylabel("generated tokens / s")
    bx.set_title("throughput")


def plot_serving_comparison(rows: Sequence[Mapping], title: str | None = None) -> Figure:
    """Continuous vs request-level batching (and MoE vs dense): TTFT and ITL p50/p99, throughput."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    draw_serving_comparison(ax, bx, rows)
    if title:
        fig.suptitle(title)
    return fig


def plot_chunked_prefill(sims: Mapping[str, object], title: str | None = None) -> Figure:
    """sims {label: ServingSimulation}: tokens per step over time (top) and each run's ITL and TTFT p50/p99 (bottom)."""
    fig = Figure(figsize=(11, 6), layout="constrained")
    ax, bx = fig.subplots(2, 1, gridspec_kw=dict(height_ratios=[3, 2]))
    for label, sim in sims.items():
        ax.step([s["start"] * 1e3 for s in sim.steps], [s["tokens"] for s in sim.steps], where="post", label=label,
                linewidth=0.8)
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("tokens in the step")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    labels = list(sims)
    width = 0.2
    for j, (key, name) in enumerate(_METRICS):
        bx.bar([i + j * width for i in range(len(labels))], [sims[k].metrics[key] * 1e3 for k in labels], width,
               label=name)
    bx.set_xticks([i + 0.3 for i in range(len(labels))], labels, fontsize=8)
    bx.set_yscale("log")
    bx.set_ylabel("ms")
    bx.legend(fontsize=7, ncol=4)
    fig.suptitle(title or "chunked prefill: time to first token against inter-token latency")
    return fig


def plot_cost_validation(rows: Sequence[Mapping], title: str | None = None) -> Figure:
    """The cost model's prediction and the measured time vs T (rows of costmodel.validate_cost_model), and the error."""
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    T = [r["tokens"] for r in rows]
    ax.plot(T, [r["measured_s"] * 1e3 for r in rows], "o-", label="measured (grouped)")
    ax.plot(T, [r["predicted_s"] * 1e3 for r in rows], "s--", label="cost model")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens (T)")
    ax.set_ylabel("ms per layer step")
    ax.legend(fontsize=8)
    bx.bar(range(len(rows)), [r["error"] * 100 for r in rows], color="tab:red")
    bx.set_xticks(range(len(rows)), [str(t) for t in T])
    bx.axhline(0, color="black", linewidth=0.8)
    bx.set_xlabel("tokens (T)")
    bx.set_ylabel("predicted / measured - 1 (%)")
    for a in (ax, bx):
        a.grid(True, alpha=0.3)
    fig.suptitle(title or "the cost model against the measured grouped strategy")
    return fig


def plot_serving_steps(steps_by_run: Mapping[str, Sequence[Mapping]], title: str | None = None) -> Figure:
    """A real serving loop, per step: tokens (decode + prefill) and dropped assignments, one row per run.

    steps_by_run: {label: ServeResult.steps} (dicts step, tokens, decode_seqs, prefill_tokens, hit_mean, dropped).
    """
    fig = Figure(figsize=(11, 2.6 * len(steps_by_run) + 0.5), layout="constrained")
    axes = fig.subplots(len(steps_by_run), 1, squeeze=False)[:, 0]
    for ax, (label, steps) in zip(axes, steps_by_run.items()):
        x = [s["step"] for s in steps]
        ax.bar(x, [s["decode_seqs"] for s in steps], color="tab:blue", label="decode tokens")
        ax.bar(x, [s["prefill_tokens"] for s in steps], bottom=[s["decode_seqs"] for s in steps],
               color="tab:gray", alpha=0.6, label="prefill tokens")
        ax.plot(x, [s["dropped"] for s in steps], "rv-", label="dropped assignments (all layers)")
        ax.set_ylabel("per step")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(title or "a real continuous-batching loop (transformers generate_batch, moe_ref blocks)")
    return fig
