"""Notebook 06 helpers: sweeps of the expert-parallel simulation, one-forward overview, and the panel.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, C capacity per expert, P ranks, El = E / P.
Every number comes from moe_ref.parallel.simulate_ep (P virtual ranks running the real plan code, with the
transport metering bytes); charts are the pure functions of moe_ref.plots.parallel.
"""

from __future__ import annotations

__all__ = ["ep_layer", "ep_imbalance_sweep", "comm_volume_sweep", "ep_figure", "ep_panel"]


def ep_layer(experts: int = 8, top_k: int = 2, d_model: int = 64, d_ff: int = 64, seed: int = 0):
    """A float32 MoELayer for the sweeps (small D, F: the traffic counts do not depend on them; bytes scale with D)."""
    from ..config import MoEConfig
    from ..layer import MoELayer

    return MoELayer(MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=experts, top_k=min(top_k, experts)), seed=seed)


def _inputs(layer, tokens: int, skew: float, seed: int):
    import torch

    from ..skew import random_routing

    c = layer.cfg
    x = torch.randn(tokens, c.d_model, generator=torch.Generator().manual_seed(seed))  # [T, D]
    return x, random_routing(tokens, c.num_experts, c.top_k, skew=skew, seed=seed)


def ep_imbalance_sweep(layer, tokens_list, skews, world_size: int = 4, trials: int = 5, seed: int = 0,
                       progress: bool = False) -> list[dict]:
    """Per-rank load imbalance (max/mean rows computed per rank) for each (T, skew), over `trials` batches.

    Row: tokens, skew, world_size, imbalance (mean over trials), imbalance_max (worst trial).
    """
    from ..parallel import simulate_ep

    cases = [(T, s) for s in skews for T in tokens_list]
    if progress:
        from tqdm.auto import tqdm

        cases = tqdm(cases, desc="EP imbalance sweep")
    rows = []
    for T, s in cases:
        imb = []
        for i in range(trials):
            x, r = _inputs(layer, T, s, seed + 1000 * i + T)
            imb.append(simulate_ep(x, r, layer.w13, layer.w2, world_size).imbalance)
        rows.append(dict(tokens=T, skew=s, world_size=world_size, imbalance=sum(imb) / len(imb),
                         imbalance_max=max(imb)))
    return rows


def comm_volume_sweep(layer, tokens: int, world_sizes=(2, 4, 8), skews=(0.0,), seed: int = 0) -> list[dict]:
    """Bytes crossing links per forward, measured by the simulation's transport, for each (P, skew).

    Row: world_size, skew, tokens, naive (scheme="naive": all-gather every token, reduce-scatter partial
    outputs), grouped (rank_program's all_to_all, one row per assignment), dedup (what one row per
    destination rank would send, computed from the routing), meta (small exchanges of the grouped scheme).
    """
    from ..parallel import simulate_ep, unique_destinations

    E = layer.cfg.num_experts
    row_bytes = layer.cfg.d_model * layer.w13.element_size()
    rows = []
    for P in world_sizes:
        for s in skews:
            x, r = _inputs(layer, tokens, s, seed)
            g = simulate_ep(x, r, layer.w13, layer.w2, P)
            n = simulate_ep(x, r, layer.w13, layer.w2, P, scheme="naive")
            u = unique_destinations(r, E, P)
            dedup = 2 * int(u.sum() - u.diagonal().sum()) * row_bytes
            rows.append(dict(world_size=P, skew=s, tokens=tokens, naive=n.link_bytes("tokens"),
                             grouped=g.link_bytes("tokens"), dedup=dedup, meta=g.link_bytes("meta")))
    return rows


def ep_figure(world_size: int = 4, tokens: int = 256, skew: float = 0.0, capacity_factor: float = 0.0,
              overflow: str = "drop", experts: int = 8, top_k: int = 2, seed: int = 0, d_model: int = 64):
    """plot_ep_overview of one simulated forward (pure: arguments in, Figure out).

    capacity_factor 0 means no capacity (dropless). With a capacity, the load panel shows the bound El*C.
    """
    from ..config import CapacityConfig
    from ..parallel import simulate_ep
    from ..plots.parallel import plot_ep_overview

    layer = ep_layer(experts, top_k, d_model=d_model, seed=seed)
    x, r = _inputs(layer, tokens, skew, seed)
    cap = CapacityConfig(capacity_factor=capacity_factor, overflow=overflow) if capacity_factor > 0 else None
    g = simulate_ep(x, r, layer.w13, layer.w2, world_size, capacity=cap)
    n = simulate_ep(x, r, layer.w13, layer.w2, world_size, scheme="naive")
    st = g.rank_stats[0]
    limit = None if st.capacity is None else (experts // world_size) * st.capacity * st.passes
    note = "" if st.capacity is None else f", C={st.capacity}, dropped {st.dropped}, passes {st.passes}"
    return plot_ep_overview(g.traffic_rows, g.rank_load, n.link_bytes("tokens"), g.link_bytes("tokens"), limit,
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
