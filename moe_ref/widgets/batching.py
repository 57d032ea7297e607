"""Panel for notebook 02: the simulated serving timeline of dynamic batching, with sliders.

Legend: T tokens in a batch, E experts, K top-k.
The simulation is moe_ref.simulate_dynamic_batching (Poisson arrivals, the cost model
moe_ref.experiments.DEFAULT_COST); the chart is moe_ref.plots.plot_batching_timeline.
"""

from __future__ import annotations

__all__ = ["batching_figure", "batching_panel"]


def batching_figure(max_wait_ms: float = 2.0, max_batch_tokens: int = 256, arrival_rate: float = 500.0,
                    skew: float = 0.0, num_requests: int = 200, experts: int = 8, top_k: int = 2, seed: int = 0,
                    cost: dict | None = None):
    """plot_batching_timeline of one simulation (pure: arguments in, Figure out).

    cost: extra simulate_dynamic_batching arguments (cost model); default moe_ref.experiments.DEFAULT_COST.
    """
    from ..batching import simulate_dynamic_batching
    from ..config import MoEConfig
    from ..experiments import DEFAULT_COST
    from ..plots.batching import plot_batching_timeline

    cfg = MoEConfig(d_model=1024, d_ff=2048, num_experts=experts, top_k=min(top_k, experts))
    sim = simulate_dynamic_batching(cfg, arrival_rate=arrival_rate, num_requests=num_requests,
                                    max_batch_tokens=max_batch_tokens, max_wait=max_wait_ms / 1e3, skew=skew,
                                    seed=seed, **(cost or DEFAULT_COST))
    return plot_batching_timeline(sim)


def batching_panel(num_requests: int = 200):
    """Sliders for max_wait, max_batch_tokens, arrival rate and skew over batching_figure."""
    import ipywidgets as W

    from ._panel import make_panel

    controls = dict(
        max_wait_ms=W.FloatSlider(value=2.0, min=0.0, max=20.0, step=0.5, description="max_wait ms"),
        max_batch_tokens=W.IntSlider(value=256, min=16, max=2048, step=16, description="max tokens"),
        arrival_rate=W.FloatSlider(value=500.0, min=50.0, max=2000.0, step=50.0, description="req/s"),
        skew=W.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.25, description="skew"),
    )

    def make(**kw):
        return batching_figure(num_requests=num_requests, **kw)

    return make_panel(make, controls, rows=[["max_wait_ms", "max_batch_tokens"], ["arrival_rate", "skew"]])
