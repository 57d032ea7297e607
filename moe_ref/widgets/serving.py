"""Panel for notebook 02b: continuous batching of an MoE, with sliders for the workload, the scheduler and E, K.

Legend: T tokens in a step, E experts, K top-k, H distinct experts a step touches, B token budget.
One figure of four: experts touched vs T (closed form), cost per token vs T for the MoE and its dense equivalent
(moe_ref.costmodel on the H200 profile), and continuous vs request-level serving (moe_ref.batching.simulate_serving)
under the same Poisson arrivals: latency and throughput.
"""

from __future__ import annotations

__all__ = ["serving_figure", "serving_panel"]

# the layer the panel prices: d_model and d_ff of a Qwen3-30B-A3B expert layer, 48 MoE layers per step
SERVING_SHAPE = dict(d_model=2048, d_ff=768, num_layers=48)


def serving_figure(arrival_rate: float = 40.0, token_budget: int = 2048, chunk_size: int = 256, experts: int = 128,
                   top_k: int = 8, num_requests: int = 120, seed: int = 0, profile=None):
    """The four-chart figure for one setting (pure: arguments in, Figure out). chunk_size 0 means whole prompts."""
    from matplotlib.figure import Figure

    from ..batching.continuous import serving_comparison
    from ..config import MoEConfig
    from ..costmodel import H200, dense_equivalent, expected_step_cost, knee_tokens
    from ..plots.serving import draw_cost_knee, draw_experts_touched, draw_serving_comparison
    from ..roofline import expected_hit

    profile = H200 if profile is None else profile
    D, F, L = SERVING_SHAPE["d_model"], SERVING_SHAPE["d_ff"], SERVING_SHAPE["num_layers"]
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=experts, top_k=top_k)
    tokens = [2**i for i in range(15)]
    curve = [dict(tokens=T, hit=expected_hit(T, experts, top_k)) for T in tokens]
    moe = [expected_step_cost(cfg, T, profile) for T in tokens]
    dense = [expected_step_cost(dense_equivalent(cfg), T, profile) for T in tokens]
    knees = {"MoE": knee_tokens(cfg, profile), "dense": knee_tokens(dense_equivalent(cfg), profile)}
    rows = serving_comparison(cfg, num_requests=num_requests, arrival_rate=arrival_rate, prompt_len=(16, 1024),
                              output_len=(16, 256), token_budget=max(token_budget, 1024),
                              chunk_size=chunk_size or None, profile=profile, num_layers=L, seed=seed)
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    (a, b), (c, d) = fig.subplots(2, 2)
    draw_experts_touched(a, curve, label=f"E={experts}, K={top_k}: E(1-(1-K/E)^T)")
    a.axhline(experts, color="gray", linestyle=":", linewidth=1)
    draw_cost_knee(b, moe, dense, knees)
    draw_serving_comparison(c, d, rows)
    fig.suptitle(f"{profile.name}: D={D}, F={F}, E={experts}, K={top_k}, {L} layers; {arrival_rate:g} req/s, "
                 f"B={max(token_budget, 1024)}, chunk={chunk_size or 'whole prompts'}", fontsize=10)
    return fig


def serving_panel(num_requests: int = 120):
    """Sliders for arrival rate, token budget, chunk size, E and K over serving_figure."""
    import ipywidgets as W

    from ._panel import make_panel

    controls = dict(
        arrival_rate=W.FloatSlider(value=40.0, min=5.0, max=200.0, step=5.0, description="req/s"),
        token_budget=W.IntSlider(value=2048, min=1024, max=8192, step=256, description="budget B"),
        chunk_size=W.IntSlider(value=256, min=0, max=2048, step=64, description="chunk (0=off)"),
        experts=W.Dropdown(options=[8, 16, 32, 64, 128, 256], value=128, description="E"),
        top_k=W.IntSlider(value=8, min=1, max=8, step=1, description="K"),
    )

    def make(**kw):
        return serving_figure(num_requests=num_requests, **kw)

    return make_panel(make, controls, rows=[["arrival_rate", "token_budget", "chunk_size"], ["experts", "top_k"]])
