"""Pictures of the Triton kernels' data layout: block-aligned grouping, the gather-GEMM tile, padding waste.

Legend: T tokens, K top-k, E experts, S = T*K slots (slot s = t*K + k), BLOCK_M rows per M-block.
A plan is anything with the fields of moe_ref.kernels.AlignedPlan: sorted_slot_ids [P] (slot of each
grouped row, S = sentinel on padding), expert_ids [P // BLOCK_M] (-1 = unused block), num_padded [1],
block_m, num_tokens, top_k. These functions only read it (on the host) and draw.
"""

from __future__ import annotations

import matplotlib
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = ["padded_rows", "plot_alignment", "plot_gather_tile", "plot_padding_waste"]

PAD_COLOR = "#dddddd"


def _expert_color(e: int, E: int):
    cmap = matplotlib.colormaps["tab20" if E > 10 else "tab10"]
    return cmap(e % cmap.N)


def _plan_lists(plan):
    n = int(plan.num_padded.reshape(-1)[0]) if torch.is_tensor(plan.num_padded) else int(plan.num_padded)
    bm = int(plan.block_m)
    slots = plan.sorted_slot_ids[:n].tolist()  # [n] used grouped rows
    experts = plan.expert_ids[: n // bm].tolist()  # [n // BLOCK_M] expert of each used block
    return n, bm, slots, experts


def padded_rows(counts: torch.Tensor, block_m: int) -> int:
    """Grouped rows after rounding each expert's count up to BLOCK_M (empty experts take none)."""
    c = counts.long()
    return int(((c + block_m - 1) // block_m * block_m).sum())


def plot_alignment(plan, num_experts: int, title: str | None = None, max_blocks: int = 48) -> Figure:
    """The aligned grouping: one row per M-block (one expert each), one cell per grouped row.

    A cell shows the slot it holds as token.choice (t.k) and is coloured by its block's expert;
    grey cells are padding (the sentinel S = T*K): rows the GEMM tiles compute and throw away.
    Right: per expert, assignments vs padded rows.
    """
    n, bm, slots, experts = _plan_lists(plan)
    S, K = int(plan.num_tokens) * int(plan.top_k), int(plan.top_k)
    blocks = min(len(experts), max_blocks)
    fig = Figure(figsize=(min(3 + 0.5 * bm, 14) + 3.5, 1.2 + 0.38 * max(blocks, 4)), layout="constrained")
    ax, bx = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[max(bm, 4), 5]))
    for b in range(blocks):
        e = experts[b]
        for j in range(bm):
            s = slots[b * bm + j]
            pad = s >= S
            ax.add_patch(Rectangle((j, blocks - 1 - b), 0.95, 0.9, facecolor=PAD_COLOR if pad else
                                   _expert_color(e, num_experts), edgecolor="white", hatch="//" if pad else None))
            if bm <= 32:
                ax.text(j + 0.47, blocks - 1 - b + 0.45, "pad" if pad else f"{s // K}.{s % K}", ha="center",
                        va="center", fontsize=6 if bm > 16 else 7, color="#777777" if pad else "black")
    # block labels as y tick labels, so the layout makes room for them
    ax.set_yticks([blocks - 1 - b + 0.45 for b in range(blocks)],
                  [f"block {b} → e{experts[b]}" for b in range(blocks)], fontsize=8)
    for b, lab in enumerate(ax.get_yticklabels()):
        lab.set_color(_expert_color(experts[b], num_experts))
    ax.tick_params(left=False, bottom=False, labelbottom=False)
    for sp in ax.spines.values():
        sp.set_visible(False)
    ax.set_xlim(-0.1, bm)
    ax.set_ylim(-0.1, max(blocks, 1))
    shown = f"first {blocks} of {len(experts)} blocks" if blocks < len(experts) else f"{len(experts)} blocks"
    ax.set_title(f"sorted_slot_ids in M-blocks of {bm} rows ({shown})\ncell = token.choice; grey = sentinel (padding)",
                 fontsize=9)
    # right: per expert, real assignments vs padding
    real = [0] * num_experts
    pad = [0] * num_experts
    for i, s in enumerate(slots):
        e = experts[i // bm]
        if e < 0:
            continue
        if s < S:
            real[e] += 1
        else:
            pad[e] += 1
    ids = list(range(num_experts))
    bx.barh(ids, real, color=[_expert_color(e, num_experts) for e in ids], label="assignments")
    bx.barh(ids, pad, left=real, color=PAD_COLOR, hatch="//", label="padding")
    bx.invert_yaxis()
    bx.set_xlabel("grouped rows")
    bx.set_ylabel("expert")
    if num_experts <= 32:
        bx.set_yticks(ids)
    waste = sum(pad) / max(n, 1)
    bx.set_title(f"{S} slots -> {n} rows ({100 * waste:.0f}% padding)", fontsize=9)
    bx.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"Block-aligned grouping: T={plan.num_tokens}, K={K}, E={num_experts}, BLOCK_M={bm}",
                 fontsize=10)
    return fig


def plot_gather_tile(plan, block: int = 0, num_experts: int | None = None) -> Figure:
    """One program of the first GEMM: the A tile of M-block `block` gathers rows slot // K straight from x.

    Left: x [T, D] with the gathered token rows highlighted; middle: the A tile [BLOCK_M, D] (padding
    rows are masked loads: zeros); right: the weight the block multiplies, w13[e] split into its gate
    and up halves, and the SwiGLU epilogue that turns the two accumulators into act rows.
    """
    n, bm, slots, experts = _plan_lists(plan)
    if not 0 <= block < len(experts):
        raise ValueError(f"block must be in [0, {len(experts) - 1}] for this plan, got {block}")
    T, K = int(plan.num_tokens), int(plan.top_k)
    S = T * K
    e = experts[block]
    E = num_experts or (max(experts) + 1)
    col = _expert_color(e, E)
    rows = slots[block * bm:(block + 1) * bm]
    fig = Figure(figsize=(10, 0.9 + 0.28 * max(T, bm)), layout="constrained")
    ax = fig.subplots()
    h = 1.0
    # x [T, D]
    for t in range(T):
        hit = any(s < S and s // K == t for s in rows)
        ax.add_patch(Rectangle((0, T - 1 - t), 3, 0.9 * h, facecolor=to_rgba(col, 0.85) if hit else "#f2f2f2",
                               edgecolor="#999999"))
        ax.text(-0.15, T - 1 - t + 0.45, f"x[{t}]", ha="right", va="center", fontsize=7)
    ax.text(1.5, T + 0.3, "x [T, D]", ha="center", fontsize=9)
    # the A tile
    top = max(T, bm)
    for j, s in enumerate(rows):
        y = top - 1 - j
        pad = s >= S
        ax.add_patch(Rectangle((5, y), 3, 0.9, facecolor=PAD_COLOR if pad else to_rgba(col, 0.85),
                               edgecolor="#999999", hatch="//" if pad else None))
        ax.text(8.15, y + 0.45, "masked: 0" if pad else f"slot {s} = t{s // K}.k{s % K}", va="center", fontsize=7)
        if not pad:
            t = s // K
            ax.annotate("", xy=(5, y + 0.45), xytext=(3, T - 1 - t + 0.45),
                        arrowprops=dict(arrowstyle="->", color=col, lw=0.8, alpha=0.7))
    ax.text(6.5, top + 0.3, f"A tile of block {block}\n[BLOCK_M={bm}, D] (gathered)", ha="center", fontsize=9)
    # weights and epilogue
    ax.add_patch(Rectangle((11, top / 2), 2.2, top / 2 - 0.1, facecolor=to_rgba(col, 0.45), edgecolor=col))
    ax.add_patch(Rectangle((11, 0), 2.2, top / 2 - 0.1, facecolor=to_rgba(col, 0.25), edgecolor=col))
    ax.text(12.1, 3 * top / 4, f"gate\nw13[{e}][:F]", ha="center", va="center", fontsize=8)
    ax.text(12.1, top / 4, f"up\nw13[{e}][F:]", ha="center", va="center", fontsize=8)
    ax.text(12.1, top + 0.3, f"expert {e} (expert_ids[{block}])", ha="center", fontsize=9)
    ax.text(13.6, top / 2, "acc_g = A @ gate^T\nacc_u = A @ up^T\n\nepilogue:\nact = silu(acc_g) * acc_u\n"
            "-> act rows of block\n(grouped order)", va="center", fontsize=8)
    ax.set_xlim(-1.5, 17.5)
    ax.set_ylim(-0.5, top + 1.3)
    ax.set_axis_off()
    ax.set_title("gather-GEMM tile: the A tile is loaded straight from x's rows; no permuted copy of x exists",
                 fontsize=9)
    return fig


def plot_padding_waste(counts_by_tokens: dict[int, torch.Tensor], block_ms=(16, 32, 64, 128),
                       title: str | None = None) -> Figure:
    """Share of computed rows that are padding vs T, one line per BLOCK_M ({T: counts [E]} in).

    Decode-sized batches put a handful of rows on each hit expert, so big tiles are mostly padding:
    that is why the tile config picks BLOCK_M by token count.
    """
    Ts = sorted(counts_by_tokens)
    fig = Figure(figsize=(6.2, 3.6), layout="constrained")
    ax = fig.subplots()
    for bm in block_ms:
        waste = []
        for T in Ts:
            c = counts_by_tokens[T]
            rows = padded_rows(c, bm)
            waste.append(1 - int(c.sum()) / rows if rows else 0.0)
        ax.plot(Ts, waste, marker="o", label=f"BLOCK_M={bm}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("padding share of computed rows")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Padding from rounding each expert's rows up to BLOCK_M", fontsize=10)
    return fig
