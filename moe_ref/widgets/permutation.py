"""Panel for notebook 04: the token-flow picture (route -> group -> permute -> unpermute), with sliders.

Legend: T tokens, E experts, K top-k.
The routing is moe_ref.skew.random_routing (Zipf `skew`), the plan moe_ref.group_by_expert; the chart is
moe_ref.plots.plot_token_flow, the same pure function the notebook calls first. The pipeline itself,
step by step, is moe_ref.grouped.grouped_steps.
"""

from __future__ import annotations

__all__ = ["token_flow_figure", "token_flow_panel"]


def token_flow_figure(tokens: int = 6, experts: int = 4, top_k: int = 2, skew: float = 0.0, seed: int = 0):
    """plot_token_flow for a random routing of a few tokens (pure: arguments in, Figure out)."""
    from ..grouping import group_by_expert
    from ..plots.permutation import plot_token_flow
    from ..skew import random_routing

    r = random_routing(tokens, experts, min(top_k, experts), skew=skew, seed=seed)
    return plot_token_flow(r.topk_ids, r.topk_weights, group_by_expert(r.topk_ids, experts))


def token_flow_panel(max_tokens: int = 16, max_experts: int = 8):
    """Sliders for tokens, experts, top-k, skew and seed over token_flow_figure."""
    import ipywidgets as W

    from ._panel import make_panel

    controls = dict(
        tokens=W.IntSlider(value=6, min=1, max=max_tokens, description="T tokens"),
        experts=W.IntSlider(value=4, min=1, max=max_experts, description="E experts"),
        top_k=W.IntSlider(value=2, min=1, max=4, description="K top-k"),
        skew=W.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.25, description="skew"),
        seed=W.IntSlider(value=0, min=0, max=20, description="seed"),
    )
    return make_panel(token_flow_figure, controls, rows=[["tokens", "experts", "top_k"], ["skew", "seed"]])
