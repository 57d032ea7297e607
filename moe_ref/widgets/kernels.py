"""Panel for notebook 07: the block-aligned grouping picture, with sliders.

Legend: T tokens, E experts, K top-k, BLOCK_M rows per M-block.
The routing is moe_ref.skew.random_routing (Zipf popularity `skew`); the plan is built by `align_fn`
(default: the torch reference moe_ref.kernels.align_block_size_torch, so moving a slider needs no
Triton); the picture is moe_ref.plots.plot_alignment, the same pure function the notebook calls first.
"""

from __future__ import annotations

__all__ = ["alignment_figure", "alignment_panel"]


def alignment_figure(T: int = 12, E: int = 6, K: int = 2, block_m: int = 4, skew: float = 1.0, seed: int = 0,
                     align_fn=None):
    """The alignment picture for a random routing of T tokens (pure: arguments in, Figure out)."""
    from ..plots.kernels import plot_alignment
    from ..skew import random_routing

    if align_fn is None:
        from moe_ref.kernels import align_block_size_torch as align_fn
    r = random_routing(T, E, K, skew=skew, seed=seed)
    plan = align_fn(r.topk_ids, E, block_m)
    return plot_alignment(plan, E)


def alignment_panel(align_fn=None, max_tokens: int = 64, max_experts: int = 16):
    """Sliders for T, E, K, BLOCK_M, skew and seed over alignment_figure (K is capped at E)."""
    import ipywidgets as W

    from ._panel import make_panel

    controls = dict(
        T=W.IntSlider(value=12, min=1, max=max_tokens, description="T tokens"),
        E=W.IntSlider(value=6, min=1, max=max_experts, description="E experts"),
        K=W.IntSlider(value=2, min=1, max=max_experts, description="K top-k"),
        block_m=W.Dropdown(options=[1, 2, 4, 8, 16], value=4, description="BLOCK_M"),
        skew=W.FloatSlider(value=1.0, min=0.0, max=3.0, step=0.25, description="skew"),
        seed=W.IntSlider(value=0, min=0, max=20, description="seed"),
    )

    def make(T, E, K, block_m, skew, seed):
        return alignment_figure(T, E, min(K, E), block_m, skew, seed, align_fn)

    return make_panel(make, controls, rows=[["T", "E", "K"], ["block_m", "skew", "seed"]])
