"""Notebook 04 helpers: the grouped pipeline stage by stage (with intermediates and timings), and its panel.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, N grouped rows.
`walkthrough` runs route -> group -> permute -> expert FFN per contiguous block -> unpermute + combine
with the library's functions and returns every intermediate, so a notebook can show and check each one;
the "grouped" strategy (moe_ref.grouped) does the same steps in one call.
"""

from __future__ import annotations

__all__ = ["walkthrough", "stage_times", "token_flow_figure", "token_flow_panel"]


def expert_blocks(xs, plan, w13, w2):
    """ys [N, D]: each expert's FFN on its contiguous block xs[offsets[e]:offsets[e+1]] (one GEMM pair each)."""
    import torch

    from ..reference import expert_ffn

    ys = torch.empty_like(xs)  # [N, D]
    bounds = plan.offsets.tolist()
    for e in range(plan.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            ys[lo:hi] = expert_ffn(xs[lo:hi], w13[e], w2[e])
    return ys


def walkthrough(layer, x, method: str = "argsort", routing=None) -> dict:
    """Run the grouped pipeline on x [T, D] step by step: routing, plan, xs [N, D], ys [N, D], y [T, D]."""
    from ..grouping import group_by_expert
    from ..permute import permute, unpermute

    r = routing if routing is not None else layer.route(x)
    plan = group_by_expert(r.topk_ids, layer.cfg.num_experts, method=method)
    xs = permute(x, plan)  # [N, D] grouped copy of the token rows
    ys = expert_blocks(xs, plan, layer.w13, layer.w2)  # [N, D]
    y = unpermute(ys, plan, r.topk_weights)  # [T, D]
    return dict(routing=r, plan=plan, xs=xs, ys=ys, y=y)


def stage_times(layer, x, reps: int = 5) -> dict:
    """Median seconds of each stage of the grouped pipeline on x [T, D] (keys in pipeline order)."""
    import torch

    from ..bench import time_cpu
    from ..grouping import group_by_expert
    from ..permute import permute, unpermute

    E = layer.cfg.num_experts
    with torch.inference_mode():
        st = walkthrough(layer, x)
        r, plan, xs, ys = st["routing"], st["plan"], st["xs"], st["ys"]
        return {
            "route": time_cpu(lambda: layer.route(x), reps=reps),
            "group": time_cpu(lambda: group_by_expert(r.topk_ids, E), reps=reps),
            "permute": time_cpu(lambda: permute(x, plan), reps=reps),
            "expert FFNs (contiguous blocks)": time_cpu(lambda: expert_blocks(xs, plan, layer.w13, layer.w2),
                                                        reps=reps),
            "unpermute + combine": time_cpu(lambda: unpermute(ys, plan, r.topk_weights), reps=reps),
        }


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
