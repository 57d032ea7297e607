"""Notebook 05 helpers: the overflow strategies side by side, load vs capacity, and the panel.

Legend: T tokens, D d_model, E experts, K top-k, C capacity per expert.
Uses moe_ref.apply_capacity / MoELayer(capacity=...) and moe_ref.metrics; charts are the pure functions
of moe_ref.plots.capacity.
"""

from __future__ import annotations

__all__ = ["overflow_comparison", "capacity_figure", "capacity_panel"]


def overflow_comparison(layer, x, routing, capacity_factor: float, drop_policy: str = "position",
                        strategy: str = "padded", overflows=("drop", "reroute", "spill", "dropless", "error"),
                        reps: int = 3) -> list[dict]:
    """One row per overflow strategy on the same routing of x [T, D]: error vs dropless, cost, or the error raised.

    Row: overflow, capacity, dropped, dropped_tokens, rerouted, passes, computed_rows, padded_slots,
    drop_share, rel_error (vs the dropless output), seconds (median), error (message or None), output.
    """
    import torch

    from ..bench import time_cpu
    from ..config import CapacityConfig
    from ..metrics import drop_share, relative_error

    with torch.inference_mode():
        base = layer(x, strategy=strategy, routing=routing).output  # dropless
        rows = []
        for ov in overflows:
            cap = CapacityConfig(capacity_factor=capacity_factor, drop_policy=drop_policy, overflow=ov)
            try:
                out = layer(x, strategy=strategy, routing=routing, capacity=cap)
            except ValueError as e:
                rows.append(dict(overflow=ov, error=str(e), rel_error=float("nan"), computed_rows=0, padded_slots=0,
                                 passes=0, seconds=float("nan"), output=None))
                continue
            s = out.stats
            sec = time_cpu(lambda cap=cap: layer(x, strategy=strategy, routing=routing, capacity=cap), reps=reps)
            rows.append(dict(overflow=ov, error=None, capacity=s.capacity, dropped=s.dropped,
                             dropped_tokens=s.dropped_tokens, rerouted=s.rerouted, passes=s.passes,
                             computed_rows=s.computed_rows, padded_slots=s.padded_slots, drop_share=drop_share(s),
                             rel_error=relative_error(out.output, base), seconds=sec, output=out.output))
    return rows


def capacity_figure(skew: float = 1.0, capacity_factor: float = 1.25, drop_policy: str = "position",
                    overflow: str = "drop", tokens: int = 256, experts: int = 8, top_k: int = 2, seed: int = 0):
    """plot_capacity_load for a random routing under a CapacityConfig (pure: arguments in, Figure out).

    overflow="error" raises the library's ValueError when an expert is over capacity (the panel prints it).
    """
    from ..capacity import apply_capacity
    from ..config import CapacityConfig
    from ..plots.capacity import plot_capacity_load
    from ..skew import random_routing
    from ..stats import expert_counts

    K = min(top_k, experts)
    r = random_routing(tokens, experts, K, skew=skew, seed=seed)
    cap = CapacityConfig(capacity_factor=capacity_factor, drop_policy=drop_policy, overflow=overflow)
    res = apply_capacity(r, experts, cap)
    counts = expert_counts(r.topk_ids, experts)  # [E] routed
    if overflow == "spill":
        kept = expert_counts(res.passes[0].topk_ids, experts)  # first pass; the rest run in later passes
        note = f"{len(res.passes)} passes, nothing lost"
    else:
        kept = expert_counts(res.final_ids, experts)
        note = f"dropped {res.dropped} of {tokens * K}, rerouted {res.rerouted}"
    C = res.capacity
    return plot_capacity_load(counts, kept, C, title=f"C = {C if C is not None else 'none'} "
                              f"(cf={capacity_factor:g}, {drop_policy}, {overflow}): {note}")


def capacity_panel(tokens: int = 256, experts: int = 8, top_k: int = 2):
    """Sliders for skew and capacity factor, dropdowns for drop policy and overflow, over capacity_figure."""
    import ipywidgets as W

    from ._panel import make_panel

    controls = dict(
        skew=W.FloatSlider(value=1.0, min=0.0, max=3.0, step=0.25, description="skew"),
        capacity_factor=W.FloatSlider(value=1.25, min=0.25, max=3.0, step=0.25, description="capacity f."),
        drop_policy=W.Dropdown(options=["position", "probability"], value="position", description="policy"),
        overflow=W.Dropdown(options=["drop", "reroute", "spill", "dropless", "error"], value="drop",
                            description="overflow"),
    )

    def make(**kw):
        return capacity_figure(tokens=tokens, experts=experts, top_k=top_k, **kw)

    return make_panel(make, controls, rows=[["skew", "capacity_factor"], ["drop_policy", "overflow"]])
