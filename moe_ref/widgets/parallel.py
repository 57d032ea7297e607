"""Panel for notebook 06: one simulated expert-parallel forward (traffic, per-rank load), with controls.

Legend: T tokens, D d_model, E experts, K top-k, C capacity per expert, P ranks, El = E / P.
Every number comes from moe_ref.parallel.simulate_ep (P virtual ranks running the real plan code, with the
transport metering bytes) on moe_ref.experiments.ep_layer / ep_inputs; the chart is
moe_ref.plots.plot_ep_overview.
"""

from __future__ import annotations

__all__ = ["ep_figure", "ep_panel"]


def ep_figure(world_size: int = 4, tokens: int = 256, skew: float = 0.0, capacity_factor: float = 0.0,
              overflow: str = "drop", experts: int = 8, top_k: int = 2, seed: int = 0, d_model: int = 64):
    """plot_ep_overview of one simulated forward (pure: arguments in, Figure out).

    capacity_factor 0 means no capacity (dropless). With a capacity, the load panel shows the bound (E/P)·C·passes.
    """
    from ..config import CapacityConfig
    from ..experiments import ep_inputs, ep_layer
    from ..parallel import simulate_ep
    from ..plots.parallel import plot_ep_overview

    layer = ep_layer(experts, top_k, d_model=d_model, seed=seed)
    x, r = ep_inputs(layer, tokens, skew, seed)
    cap = CapacityConfig(capacity_factor=capacity_factor, overflow=overflow) if capacity_factor > 0 else None
    g = simulate_ep(x, r, layer.w13, layer.w2, world_size, capacity=cap)
    n = simulate_ep(x, r, layer.w13, layer.w2, world_size, scheme="naive")
    st = g.rank_stats[0]
    limit = None if st.capacity is None else (experts // world_size) * st.capacity * st.passes
    note = "" if st.capacity is None else f", C={st.capacity}, dropped {st.dropped}, passes {st.passes}"
    return plot_ep_overview(g.traffic_rows, g.rank_load, n.link_bytes("tokens"), g.link_bytes("tokens"), limit,
                            passes=st.passes,
                            title=f"P={world_size}, T={tokens}, E={experts}, K={min(top_k, experts)}, "
                                  f"skew={skew:g}{note}")


def ep_panel(tokens: int = 256, experts: int = 8, top_k: int = 2):
    """Dropdown for P, sliders for tokens, skew and capacity factor, dropdown for overflow, over ep_figure."""
    import ipywidgets as W

    from ._panel import make_panel

    divisors = [p for p in (1, 2, 4, 8, 16, 32, 64) if experts % p == 0]
    controls = dict(
        world_size=W.Dropdown(options=divisors, value=4 if 4 in divisors else divisors[-1], description="ranks P"),
        tokens=W.IntSlider(value=tokens, min=1, max=4096, step=1, description="tokens T"),
        skew=W.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.25, description="skew"),
        capacity_factor=W.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.25, description="cap. factor"),
        overflow=W.Dropdown(options=["drop", "reroute", "spill", "dropless", "error"], value="drop",
                            description="overflow"),
    )
    return make_panel(lambda **v: ep_figure(experts=experts, top_k=top_k, **v), controls,
                      rows=[["world_size", "tokens", "skew"], ["capacity_factor", "overflow"]])
