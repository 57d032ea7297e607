"""Panel for notebook 01: how a routing's per-expert loads make naive batching wasteful.

Legend: T tokens, E experts, K top-k.
The routing is moe_ref.skew.random_routing (Zipf popularity `skew`); the chart is
moe_ref.plots.plot_naive_work, the same pure function the notebook calls first.
"""

from __future__ import annotations

__all__ = ["naive_figure", "naive_panel"]


def naive_figure(tokens: int = 64, experts: int = 8, top_k: int = 2, skew: float = 0.0, seed: int = 0):
    """plot_naive_work for a random routing of `tokens` tokens (pure: arguments in, Figure out)."""
    from ..plots.naive import plot_naive_work
    from ..skew import random_routing
    from ..stats import expert_counts

    r = random_routing(tokens, experts, min(top_k, experts), skew=skew, seed=seed)
    return plot_naive_work(expert_counts(r.topk_ids, experts), tokens, min(top_k, experts))


def naive_panel(tokens: int = 64, experts: int = 8, top_k: int = 2, max_tokens: int = 512, max_experts: int = 64):
    """Sliders for tokens, experts, top-k, skew and seed over naive_figure (top-k is clipped to experts)."""
    import ipywidgets as W

    from ._panel import make_panel

    controls = dict(
        tokens=W.IntSlider(value=tokens, min=1, max=max_tokens, description="T tokens"),
        experts=W.IntSlider(value=experts, min=1, max=max_experts, description="E experts"),
        top_k=W.IntSlider(value=top_k, min=1, max=8, description="K top-k"),
        skew=W.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.25, description="skew"),
        seed=W.IntSlider(value=0, min=0, max=20, description="seed"),
    )
    return make_panel(naive_figure, controls, rows=[["tokens", "experts", "top_k"], ["skew", "seed"]])
