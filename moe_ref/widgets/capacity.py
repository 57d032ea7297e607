"""Panel for notebook 05: each expert's load against its capacity, with sliders.

Legend: T tokens, E experts, K top-k, C capacity per expert.
The routing is moe_ref.skew.random_routing (Zipf `skew`), capacity is moe_ref.apply_capacity;
the chart is moe_ref.plots.plot_capacity_load, the same pure function the notebook calls first.
"""

from __future__ import annotations

__all__ = ["capacity_figure", "capacity_panel"]


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
