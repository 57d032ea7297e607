"""The roofline prediction of moe_ref.roofline drawn: lower-bound time and best TFLOP/s vs T per shape.

Legend: T tokens, D d_model, F d_ff per expert, K top-k. Rows are moe_ref.roofline.roofline_point dicts;
optional timings to overlay are dicts {shape, tokens, provider, ms} (or median_ms, as the device sweep
writes them; rows whose status is not "ok" are left out).
"""

from __future__ import annotations

from matplotlib.figure import Figure

from ..roofline import ExpertShape, crossover_tokens, expert_flops

__all__ = ["plot_roofline"]

HBM_COLOR, MATMUL_COLOR = "#1f77b4", "#d62728"
OVERLAY_COLORS = ("#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def _timings(measured, shapes: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{shape: {provider: [(T, ms), ...]}} of the rows to overlay, sorted by T."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in measured:
        if r.get("status", "ok") != "ok":
            continue
        ms = r.get("ms", r.get("median_ms"))
        if ms is None or not {"shape", "tokens", "provider"} <= set(r):
            raise ValueError(f"measured rows need shape, tokens, provider and ms; got keys {sorted(r)}")
        if r["shape"] not in shapes:
            raise ValueError(f"measured row for shape {r['shape']!r}, which has no roofline row (have {shapes})")
        out.setdefault(r["shape"], {}).setdefault(r["provider"], []).append((int(r["tokens"]), float(ms)))
    return {s: {p: sorted(v) for p, v in d.items()} for s, d in out.items()}


def _draw_time(ax, rows: list[dict], t_star: float) -> None:
    T = [r["tokens"] for r in rows]
    ax.plot(T, [r["hbm_us"] for r in rows], "--", color=HBM_COLOR, lw=1.2, label="HBM limit: bytes / bandwidth")
    ax.plot(T, [r["matmul_us"] for r in rows], "--", color=MATMUL_COLOR, lw=1.2, label="matmul limit: FLOPs / rate")
    ax.plot(T, [r["bound_us"] for r in rows], "-", color="black", lw=1.6, label="lower bound (max of the two)")
    for binds, color, marker in (("hbm", HBM_COLOR, "o"), ("matmul", MATMUL_COLOR, "s")):
        sel = [r for r in rows if r["binds"] == binds]
        ax.scatter([r["tokens"] for r in sel], [r["bound_us"] for r in sel], color=color, marker=marker, zorder=3,
                   s=28, label=f"{'HBM' if binds == 'hbm' else 'matmul'} binds")
    if T[0] <= t_star <= T[-1]:
        ax.axvline(t_star, color="#888888", ls=":", lw=1)
        ax.annotate(f"T* ≈ {t_star:,.0f}", (t_star, 0.97), xycoords=("data", "axes fraction"), ha="right",
                    va="top", fontsize=8, color="#555555", rotation=90)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("µs per layer forward")


def _draw_rate(ax, rows: list[dict]) -> None:
    T = [r["tokens"] for r in rows]
    ax.plot(T, [r["tflops"] for r in rows], "-", color="black", lw=1.6, label="best useful TFLOP/s at the bound")
    ax.axhline(rows[0]["matmul_flops"] / 1e12, color=MATMUL_COLOR, ls="--", lw=1.2, label="matmul rate")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("TFLOP/s (6·D·F·T·K / time)")


def _overlay(ax_t, ax_r, shape: ExpertShape, series: dict[str, list[tuple[int, float]]], colors: dict) -> list:
    """Draw each provider's timings as µs (top) and TFLOP/s of useful work (bottom); returns the top lines."""
    lines = []
    for provider, pts in series.items():
        T, style = [t for t, _ in pts], dict(marker="x", ls="-", lw=0.8, ms=5, color=colors[provider])
        lines += ax_t.plot(T, [ms * 1e3 for _, ms in pts], label=provider, **style)
        ax_r.plot(T, [expert_flops(shape, t) / (ms * 1e-3) / 1e12 for t, ms in pts], label=provider, **style)
    return lines


def _shape(row: dict) -> ExpertShape:
    return ExpertShape(row["shape"], row["d_model"], row["d_ff"], row["num_experts"], row["top_k"])


def _draw_shape(ax_t, ax_r, rows: list[dict], series: dict[str, list[tuple[int, float]]], colors: dict,
                legend: bool) -> None:
    """One shape's two panels: roofline rows sorted by T, and the timings to overlay (if any)."""
    r0, shape = rows[0], _shape(rows[0])
    t_star = crossover_tokens(shape, elem_bytes=r0["elem_bytes"], hbm_bps=r0["hbm_bps"],
                              matmul_flops=r0["matmul_flops"], intermediate=r0["intermediate"])
    _draw_time(ax_t, rows, t_star)
    _draw_rate(ax_r, rows)
    lines = _overlay(ax_t, ax_r, shape, series, colors)
    if legend:  # the full legend, once per figure
        ax_t.legend(fontsize=7, loc="lower right")
        ax_r.legend(fontsize=7, loc="lower right")
    elif lines:
        ax_t.legend(handles=lines, fontsize=7, loc="lower right")
    ax_t.set_title(f"{r0['shape']}\nD={r0['d_model']} F={r0['d_ff']} E={r0['num_experts']} K={r0['top_k']}",
                   fontsize=9)


def plot_roofline(rows: list[dict], measured: list[dict] | None = None, title: str | None = None) -> Figure:
    """The roofline prediction per shape: lower-bound µs vs T above, best useful TFLOP/s below.

    Top panels (log-log): the bound, both limits dashed, a marker per T showing which binds, the crossover T*.
    Bottom panels: the best useful TFLOP/s (6·D·F·T·K / bound) a kernel could reach, against the matmul rate.

    measured: optional timings {shape, tokens, provider, ms} drawn over both panels (x markers), e.g. the
    ok rows of a device sweep; a row for a shape without roofline rows raises ValueError.
    """
    if not rows:
        raise ValueError("rows must hold at least one roofline row (moe_ref.roofline.roofline_table)")
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    timings = _timings(measured or [], shapes)
    fig = Figure(figsize=(3.9 * len(shapes), 6.4), layout="constrained")
    axes = fig.subplots(2, len(shapes), squeeze=False, sharex="col")
    providers = dict.fromkeys(p for d in timings.values() for p in d)
    colors = {p: OVERLAY_COLORS[i % len(OVERLAY_COLORS)] for i, p in enumerate(providers)}
    for j, name in enumerate(shapes):
        sel = sorted((r for r in rows if r["shape"] == name), key=lambda r: r["tokens"])
        _draw_shape(axes[0, j], axes[1, j], sel, timings.get(name, {}), colors, legend=j == 0)
    r0 = rows[0]
    fig.suptitle(title or f"Roofline prediction (lines; no GPU run): max(bytes / {r0['hbm_bps'] / 1e12:.1f} TB/s, "
                          f"FLOPs / {r0['matmul_flops'] / 1e12:.0f} TFLOP/s), {r0['elem_bytes']} bytes per element, "
                          "uniform routing" + ("; x: the timings passed in" if timings else ""), fontsize=10)
    return fig
