"""Panel for notebook 03: tokens coloured by expert before and after grouping, with sliders.

Legend: T tokens, E experts, K top-k.
Routing: moe_ref.skew.random_routing (Zipf `skew`); plan: moe_ref.group_by_expert(method=...);
chart: moe_ref.plots.plot_grouping, the same pure function the notebook calls first.
"""

from __future__ import annotations

__all__ = ["grouping_figure", "grouping_panel"]


def grouping_figure(tokens: int = 12, experts: int = 4, top_k: int = 2, skew: float = 0.0, method: str = "argsort",
                    seed: int = 0):
    """plot_grouping for a random routing (pure: arguments in, Figure out)."""
    from ..grouping import group_by_expert
    from ..plots.grouping import plot_grouping
    from ..skew import random_routing

    K = min(top_k, experts)
    r = random_routing(tokens, experts, K, skew=skew, seed=seed)
    return plot_grouping(r.topk_ids, group_by_expert(r.topk_ids, experts, method=method),
                         title=f"method={method!r}, skew={skew:g}")


def grouping_panel(max_tokens: int = 32, max_experts: int = 12):
    """Sliders for tokens, experts, top-k, skew, seed and a method dropdown over grouping_figure."""
    import ipywidgets as W

    from ._panel import make_panel

    controls = dict(
        tokens=W.IntSlider(value=12, min=1, max=max_tokens, description="T tokens"),
        experts=W.IntSlider(value=4, min=1, max=max_experts, description="E experts"),
        top_k=W.IntSlider(value=2, min=1, max=4, description="K top-k"),
        skew=W.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.25, description="skew"),
        method=W.Dropdown(options=["argsort", "counting"], value="argsort", description="method"),
        seed=W.IntSlider(value=0, min=0, max=20, description="seed"),
    )
    return make_panel(grouping_figure, controls, rows=[["tokens", "experts", "top_k"], ["skew", "method", "seed"]])
