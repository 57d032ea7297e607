"""Charts of benchmark results (JSON written by moe_ref.bench): the CPU run and the device sweep.

Legend: T tokens. Device results hold rows {shape, tokens, provider, status, median_ms, tflops, gbps,
hbm_frac_nominal, hbm_frac_measured, matmul_frac, ...} (see moe_ref.bench_gpu); skipped or failed
rows are left out of the lines, so a partial sweep still draws.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["plot_bench_cpu", "plot_bench_gpu_times", "plot_bench_gpu_ratios", "plot_bench_gpu_roofline",
           "plot_tuning"]


YMAX = 3.0  # ratio to the bound above which a CPU chart clips (and says what it clipped)


def plot_bench_cpu(result: dict) -> Figure:
    """Time / the GEMM-only bound against T, one panel per (shape, dtype), one line per provider.

    Error bars: each provider's interquartile range over the bound's median. A row that could not be trusted
    (faster than its own bound, or a wide spread) is circled in red, and its panel's title says so. The dotted line
    at 1.10 is the grouped strategy's target at T >= 1024. One legend for all panels, below them (a legend inside a
    panel hid the lines it crossed).
    """
    rows = [r for r in result["rows"] if r.get("status", "ok") == "ok" and not r.get("part_of")]  # no parts
    panels = sorted({(r["shape"], r["dtype"]) for r in rows})
    cols = min(len(panels), 2) or 1
    fig = Figure(figsize=(6.0 * cols, 4.0 * -(-len(panels) // cols)), layout="constrained")
    axes = list(fig.subplots(-(-len(panels) // cols), cols, squeeze=False).ravel())
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    any_untrusted = False
    for ax, (sh, dt) in zip(axes, panels):
        sel = [r for r in rows if (r["shape"], r["dtype"]) == (sh, dt)]
        bound = {r["tokens"]: r["seconds"] for r in sel if r["provider"] == "gemm_only"}
        untrusted = False
        for prov in dict.fromkeys(r["provider"] for r in sel):
            pr = sorted((r for r in sel if r["provider"] == prov), key=lambda r: r["tokens"])
            Ts = [r["tokens"] for r in pr]
            ys = [r["ratio_to_bound"] for r in pr]
            err = [r.get("iqr_s", 0.0) / bound[r["tokens"]] / 2 for r in pr]
            color, marker = PROVIDER_STYLE.get(prov, (None, "o"))
            if prov == "gemm_only":
                color, marker = "#000000", ""
            ax.errorbar(Ts, ys, yerr=err, label=prov, color=color, marker=marker, ms=4, capsize=2, lw=1.2)
            bad = [(r["tokens"], r["ratio_to_bound"]) for r in pr if r.get("warning")]
            if bad:
                untrusted = True
                ax.scatter(*zip(*bad), s=120, facecolors="none", edgecolors="red", lw=1.5, zorder=5)
        target = ax.axhline(1.10, color="#888888", ls=":", lw=1)
        top = YMAX if max(r["ratio_to_bound"] for r in sel) > YMAX else None
        if top:  # keep the interesting range readable: name what lies above it
            off = sorted({r["provider"] for r in sel if r["ratio_to_bound"] > YMAX})
            worst = max(r["ratio_to_bound"] for r in sel)
            ax.set_ylim(0.5, top)
            ax.text(0.02, 0.97, f"off scale: {', '.join(off)} (up to {worst:.0f}x)", transform=ax.transAxes,
                    va="top", fontsize=7, color="#555555", bbox=dict(fc="white", ec="none", alpha=0.85, pad=1))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time / GEMM-only bound")
        ax.set_title(f"{sh}, {dt}" + ("  (red circles: untrusted)" if untrusted else ""), fontsize=9,
                     color="red" if untrusted else "black")
        any_untrusted |= untrusted
    if panels:
        extra = {"1.10x: grouped's target at T >= 1024": target}
        if any_untrusted:
            extra["untrusted: the machine looked busy"] = Line2D([], [], ls="", marker="o", ms=9, mfc="none",
                                                                 mec="red", mew=1.5)
        _figure_legend(fig, axes[:len(panels)], ncol=5, fontsize=8, extra=extra)
    m = result["machine"]
    threads = result.get("threads", m.get("torch_threads"))
    fig.suptitle(f"{m['device']}, {threads} torch threads, torch {m['torch']}, {m['date'][:10]}", fontsize=9)
    return fig


PROVIDER_STYLE = {  # provider -> (color, marker); unknown providers get matplotlib's cycle
    "triton": ("#d62728", "o"), "triton_graph": ("#ff7f0e", "*"), "grouped_mm": ("#1f77b4", "s"),
    "grouped": ("#2ca02c", "^"), "grouped_plain": ("#98df8a", "^"),
    "loop": ("#7f7f7f", "v"), "hf_eager": ("#9467bd", "x"), "hf_grouped_mm": ("#17becf", "D"),
    "hf_batched_mm": ("#bcbd22", "P"),
}


def _ok_rows(result: dict) -> list[dict]:
    return [r for r in result["rows"] if r.get("status") == "ok"]


def _shape_names(result: dict) -> list[str]:
    names = list(result.get("shapes", {}))
    return names or sorted({r["shape"] for r in result["rows"]})


def _grid(n: int, w: float = 4.6, h: float = 3.6):
    cols = min(n, 2) if n > 1 else 1
    rows = -(-n // cols)
    fig = Figure(figsize=(w * cols, h * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _figure_legend(fig: Figure, axes, ncol: int = 4, fontsize: int = 7, extra: dict | None = None) -> None:
    """One legend for all panels, below them: each label once, from the first panel that draws it, then `extra`
    ({label: handle} for what no panel labels) (a legend inside each panel hid the lines it crossed, and repeated
    itself panel after panel)."""
    entries = {}  # label -> handle
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    entries.update(extra or {})
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncol=min(ncol, len(entries)),
                   fontsize=fontsize, frameon=False)


def _title(fig: Figure, result: dict, what: str) -> None:
    m = result.get("machine", {})
    st = result.get("settings", {})
    tag = "" if result.get("complete", True) else " [PARTIAL sweep]"
    fig.suptitle(f"{what}\n{m.get('device', '?')} ({st.get('dtype', '?')}), torch {m.get('torch', '?')}, "
                 f"triton {m.get('triton', '?')}, {str(m.get('date', '?'))[:10]}{tag}", fontsize=9)


def _series(rows: list[dict], shape: str, provider: str, key: str):
    pts = sorted((r["tokens"], r[key]) for r in rows if r["shape"] == shape and r["provider"] == provider
                 and r.get(key) is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def _style(provider: str) -> dict:
    c, m = PROVIDER_STYLE.get(provider, (None, "."))
    return dict(color=c, marker=m, lw=2.2 if provider.startswith("triton") else 1.3, ms=5)


def plot_bench_gpu_times(result: dict) -> Figure:
    """Per shape: median ms vs token count for every provider, log-log (lower is better)."""
    rows = _ok_rows(result)
    shapes = _shape_names(result)
    fig, axes = _grid(len(shapes))
    for ax, shape in zip(axes, shapes):
        provs = sorted({r["provider"] for r in rows if r["shape"] == shape}, key=lambda p: (p != "triton", p))
        for p in provs:
            t, ms = _series(rows, shape, p, "median_ms")
            ax.plot(t, ms, label=p, **_style(p))
        skipped = sorted({(r["provider"], r["tokens"]) for r in result["rows"]
                          if r["shape"] == shape and r.get("status") != "ok"})
        if skipped:
            ax.text(0.01, 0.01, f"{len(skipped)} skipped/failed (see JSON)", transform=ax.transAxes, fontsize=7,
                    color="#555555")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(shape, fontsize=10)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms (median)")
        ax.grid(True, which="both", alpha=0.3)
    _figure_legend(fig, axes)
    _title(fig, result, "MoE layer time")
    return fig


def _targets(result: dict) -> list[dict]:
    """The targets a device result was measured against (written into its settings by the sweep)."""
    return (result.get("settings") or {}).get("targets") or []


def plot_bench_gpu_ratios(result: dict) -> Figure:
    """Per shape: speedup of triton (solid) and triton_graph (dashed) over grouped_mm, loop, grouped and the
    best Hugging Face implementation vs T."""
    rat = result.get("ratios") or []
    shapes = _shape_names(result)
    fig, axes = _grid(len(shapes))
    goals = {t["metric"][3:]: t["threshold"] for t in _targets(result) if t["metric"].startswith("vs:")}
    styles = {"triton_vs_grouped_mm": ("vs grouped_mm", "#1f77b4", goals.get("grouped_mm")),
              "triton_vs_loop": ("vs loop", "#7f7f7f", goals.get("loop")),
              "triton_vs_best_hf": ("vs best HF", "#9467bd", None),
              "triton_vs_grouped": ("vs grouped", "#2ca02c", goals.get("grouped"))}
    for ax, shape in zip(axes, shapes):
        sel = sorted((r for r in rat if r["shape"] == shape), key=lambda r: r["tokens"])
        for key, (label, color, target) in styles.items():
            for v, ls, marker in (("triton", "-", "o"), ("triton_graph", "--", "*")):
                vkey = key.replace("triton", v, 1)
                pts = [(r["tokens"], r[vkey]) for r in sel if vkey in r]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=ls, color=color,
                            label=f"{v} {label}")
            if target:
                ax.axhline(target, color=color, ls=":", lw=1)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(shape, fontsize=10)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("speedup (x, > 1: triton faster)")
        ax.grid(True, which="both", alpha=0.3)
        if not sel:
            ax.text(0.5, 0.5, "no triton results", ha="center", transform=ax.transAxes)
    _figure_legend(fig, axes)
    shown = ", ".join(f"{v:g}x {k}" for k, v in goals.items())
    _title(fig, result, "Triton speedups" + (f" (dotted: targets {shown})" if shown else ""))
    return fig


def plot_bench_gpu_roofline(result: dict, providers=("triton", "triton_graph", "grouped_mm")) -> Figure:
    """Per shape: fraction of the HBM roofline (weight bytes / bandwidth) and of the measured matmul rate vs T."""
    rows = _ok_rows(result)
    shapes = _shape_names(result)
    lim = result.get("limits") or {}
    fracs = [t for t in _targets(result) if not t["metric"].startswith("vs:")]
    fig, axes = _grid(len(shapes))
    for ax, shape in zip(axes, shapes):
        for p in providers:
            st = _style(p)
            for key, ls, label in (("hbm_frac_nominal", "-", "HBM 4.3 TB/s"),
                                   ("hbm_frac_measured", "--", "measured copy BW"),
                                   ("matmul_frac", ":", "measured matmul")):
                t, v = _series(rows, shape, p, key)
                if t:
                    ax.plot(t, v, ls=ls, marker=st["marker"], color=st["color"], ms=4, label=f"{p}: {label}")
        for t, ls in zip(fracs, ("-.", (0, (1, 3)), "--")):
            ax.axhline(t["threshold"], color="#444444", lw=0.8, ls=ls)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_title(shape, fontsize=10)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("fraction of limit")
        ax.grid(True, alpha=0.3)
    _figure_legend(fig, axes, ncol=3)
    bw = lim.get("copy_Bps")
    mm = lim.get("matmul_flops")
    what = "Roofline fractions"
    if bw and mm:
        goals = " / ".join(f"{t['threshold']:g}" for t in fracs)
        what += f" (measured copy {bw / 1e12:.2f} TB/s, matmul {mm / 1e12:.0f} TFLOP/s" + \
            (f"; targets {goals})" if goals else ")")
    _title(fig, result, what)
    return fig


def plot_tuning(result: dict) -> Figure:
    """Per tuned shape, ms vs T: every config tried (grey), the default (black x), the kept one (red o).

    The label under each kept point is the default's time over the kept one's; log-log axes."""
    entries = result["entries"]
    fig, axes = _grid(max(len(entries), 1))
    for ax, e in zip(axes, entries):
        ok = [t for t in e["trials"] if t.get("status") == "ok"]
        ax.scatter([t["tokens"] for t in ok], [t["median_ms"] for t in ok], s=14, color="#aaaaaa",
                   label="configs tried", zorder=2)
        for key, style in (("default", dict(color="black", marker="x", label="default config")),
                           ("kept", dict(color="#d62728", marker="o", label="kept (fastest)"))):
            pts = []
            for T in sorted({t["tokens"] for t in ok}):
                at = [t for t in ok if t["tokens"] == T]
                pick = next((t for t in at if t["default"]), None) if key == "default" else \
                    min(at, key=lambda t: t["median_ms"])
                if pick:
                    pts.append((T, pick["median_ms"]))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, ms=6, zorder=3, **style)
        for T, sp in e.get("speedup_vs_default", {}).items():
            best = min(t["median_ms"] for t in ok if t["tokens"] == int(T))
            ax.annotate(f"{sp:.2f}x", (int(T), best), textcoords="offset points", xytext=(0, -12), ha="center",
                        fontsize=7, color="#d62728")
        if e.get("untuned"):
            ax.text(0.01, 0.01, f"untuned T: {[u['tokens'] for u in e['untuned']]}", transform=ax.transAxes,
                    fontsize=7, color="#555555")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{e['shape']} (E={e['E']}, D={e['D']}, F={e['F']}, K={e['K']})", fontsize=10)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms (median)")
        ax.grid(True, which="both", alpha=0.3)
    _figure_legend(fig, axes)
    m = result.get("machine", {})
    tag = "" if result.get("complete", True) else " [PARTIAL]"
    fig.suptitle(f"fused_moe tile configs: tried vs kept\n{m.get('device', '?')} ({result.get('dtype', '?')}), "
                 f"torch {m.get('torch', '?')}, triton {m.get('triton', '?')}, {str(m.get('date', '?'))[:10]}{tag}",
                 fontsize=9)
    return fig
