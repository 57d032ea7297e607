"""Charts of the tiny model: its training curve and the quality cost of capacity drops (pure, return Figures).

Legend: cf capacity factor; losses in nats/byte.
"""

from __future__ import annotations

from matplotlib.figure import Figure

__all__ = ["loss_figure", "quality_figure"]


def loss_figure(log: dict) -> Figure:
    """Train and held-out loss (nats/byte) against step, from a training log (train_log.json)."""
    h = log["history"]
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(h["step"], h["train_loss"], lw=0.8, alpha=0.6, label="train (batch)")
    ax.plot(h["eval_step"], h["heldout_loss"], "o-", ms=3, label="held-out files")
    ax.axhline(log["uniform_loss"], color="grey", ls=":", lw=1, label="uniform (ln 256)")
    ax.set(xlabel="step", ylabel="cross entropy (nats/byte)", ylim=(0, log["uniform_loss"] + 0.3),
           title=f"tiny MoE on the Python {log['python']} stdlib: held-out {log['final_heldout_loss']:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def quality_figure(rows: list[dict]) -> Figure:
    """Held-out loss and next-token agreement against capacity factor, one line per (phase, overflow).

    rows: quality_table() rows (keys phase, overflow, capacity_factor, loss, agreement).
    """
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    overflows = list(dict.fromkeys(r["overflow"] for r in rows if r["overflow"] != "dropless"))
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    for phase in phases:
        for i, ov in enumerate(overflows):
            sel = [r for r in rows if (r["phase"], r["overflow"]) == (phase, ov)]
            sel.sort(key=lambda r: r["capacity_factor"])
            style = dict(color=f"C{i}", ls="-" if phase == "prefill" else "--", marker="o", ms=3, label=f"{phase} {ov}")
            cf = [r["capacity_factor"] for r in sel]
            a1.plot(cf, [r["loss"] for r in sel], **style)
            a2.plot(cf, [100 * r["agreement"] for r in sel], **style)
    for r in rows:
        if r["overflow"] == "dropless" and r["phase"] == "prefill":
            a1.axhline(r["loss"], color="k", lw=1, ls=":", label="dropless")
    a1.set(xlabel="capacity factor", ylabel="held-out loss (nats/byte)", title="quality cost of capacity")
    a2.set(xlabel="capacity factor", ylabel="next-token agreement with dropless (%)", title="agreement")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    return fig


def trace_figure(loads, sharing: list[dict] | None = None,
                 title: str = "trained model: expert load per layer") -> Figure:
    """Per-layer expert load shares (heat map of loads [L, E]) and, given, neighbour sharing per layer.

    sharing: neighbour_sharing() dicts, one per layer (share of consecutive tokens with an expert in common).
    """
    share = loads.double() / loads.sum(-1, keepdim=True)  # [L, E]
    L, E = share.shape
    ncols = 2 if sharing else 1
    fig = Figure(figsize=(5.2 * ncols, 0.6 * L + 1.8), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(share.numpy(), cmap="viridis", aspect="auto")
    for i in range(L):
        for e in range(E):
            ax.text(e, i, f"{100 * share[i, e]:.0f}", ha="center", va="center", fontsize=7, color="w")
    ax.set(xlabel="expert", ylabel="layer", title=title, xticks=range(E), yticks=range(L))
    fig.colorbar(im, ax=ax, label="share of assignments (uniform = 1/E)")
    if sharing:
        ax = axes[0, 1]
        x = range(L)
        ax.bar([i - 0.2 for i in x], [s["any"] for s in sharing], 0.4, label="t, t+1 share an expert")
        ax.bar([i + 0.2 for i in x], [s["top1"] for s in sharing], 0.4, label="same first choice")
        ax.axhline(sharing[0]["any_uniform"], color="C0", ls=":", label="uniform, any")
        ax.axhline(sharing[0]["top1_uniform"], color="C1", ls=":", label="uniform, first choice")
        ax.set(xlabel="layer", ylabel="share of neighbouring pairs", ylim=(0, 1), xticks=list(x),
               title="neighbouring tokens")
        ax.legend(fontsize=7)
    return fig
