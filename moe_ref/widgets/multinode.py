"""Panels for notebooks 06b (expert parallelism past one node) and 08 (choosing a strategy).

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, P ranks = N nodes × L ranks per node, M max nodes
per token, R redundant expert slots.
`multinode_figure`: one simulated forward (moe_ref.parallel.simulate_ep, flat and hierarchical) with
optional node-limited routing, EPLB-style replication planned on another batch, and the modeled timeline
with and without two-micro-batch overlap. `strategy_panel` draws whatever a given advice function returns
(the notebook passes moe_ref.advise's `advice_cells`; this module does not import it: advise sits above).
"""

from __future__ import annotations

__all__ = ["multinode_figure", "multinode_panel", "strategy_panel"]


def multinode_figure(nodes: int = 2, ranks_per_node: int = 2, tokens: int = 256, skew: float = 1.0,
                     max_nodes: int = 0, replicas: int = 0, experts: int = 16, top_k: int = 4, seed: int = 0,
                     d_model: int = 32, time_d_model: int = 2048, time_d_ff: int = 1024):
    """plot_multinode_overview of one configuration (pure: arguments in, Figure out).

    max_nodes 0 = unrestricted routing. Bytes are measured on rows of d_model float32 values; the timelines
    price rows of time_d_model bf16 values and experts of time_d_model × time_d_ff (roofline, H200 figures)
    on NVLink + 400 Gb/s IB spec links.
    """
    from ..experiments import ep_inputs, ep_layer
    from ..parallel import Topology, inter_node_bytes, simulate_ep
    from ..parallel.replicate import contiguous_plan, rank_loads, replicate_experts
    from ..parallel.timeline import layer_timeline, micro_batch_loads
    from ..plots.multinode import plot_multinode_overview
    from ..router import node_limited_routing
    from ..stats import expert_counts

    N, L = nodes, ranks_per_node
    P, E = N * L, experts
    layer = ep_layer(E, top_k, d_model=d_model, seed=seed)
    K = layer.cfg.top_k
    x, r = ep_inputs(layer, tokens, skew, seed)
    if max_nodes and max_nodes < N:
        r = node_limited_routing(r.logits, K, num_nodes=N, max_nodes=max_nodes)
    topo = Topology(N, L)
    inter = {}
    for scheme in ("grouped", "hierarchical"):
        sim = simulate_ep(x, r, layer.w13, layer.w2, P, scheme=scheme, ranks_per_node=L)
        inter["flat" if scheme == "grouped" else "hierarchical"] = inter_node_bytes(sim.traffic_bytes["tokens"], topo)
    _, observed = ep_inputs(layer, tokens, skew, seed + 1)  # plan on another batch of the same router
    plan = replicate_experts(expert_counts(observed.topk_ids, E), replicas, P)
    before, after = rank_loads(r, contiguous_plan(E, P)), rank_loads(r, plan)
    tls = [layer_timeline(micro_batch_loads(r, E, P, m), topo, time_d_model, time_d_ff) for m in (1, 2)]
    lim = f", M={max_nodes}" if max_nodes and max_nodes < N else ""
    return plot_multinode_overview(inter, before, after, tls,
                                   title=f"{N} nodes x {L} ranks, T={tokens}, E={E}, K={K}, skew={skew:g}{lim}, "
                                         f"R={replicas}")


def multinode_panel(tokens: int = 256, experts: int = 16, top_k: int = 4):
    """Dropdowns for nodes and ranks per node, sliders for tokens, skew, max nodes and replicas."""
    import ipywidgets as W

    from ._panel import make_panel

    controls = dict(
        nodes=W.Dropdown(options=[1, 2, 4], value=2, description="nodes N"),
        ranks_per_node=W.Dropdown(options=[1, 2, 4], value=2, description="ranks/node"),
        tokens=W.IntSlider(value=tokens, min=8, max=4096, step=8, description="tokens T"),
        skew=W.FloatSlider(value=1.0, min=0.0, max=3.0, step=0.25, description="skew"),
        max_nodes=W.IntSlider(value=0, min=0, max=4, step=1, description="max nodes M"),
        replicas=W.Dropdown(options=[0, 4, 8, 16], value=4, description="replicas R"),
    )
    return make_panel(lambda **v: multinode_figure(experts=experts, top_k=top_k, **v), controls,
                      rows=[["nodes", "ranks_per_node", "tokens"], ["skew", "max_nodes", "replicas"]])


def strategy_panel(advice_cells, tokens: int = 64, skew: float = 1.0):
    """Sliders for tokens per step and skew, a dropdown for the topology, over plot_advice(advice_cells(...)).

    advice_cells(tokens=, skew=, topology=) -> {cell title: advice rows} (moe_ref.advise.advice_cells).
    """
    import ipywidgets as W

    from ..plots.multinode import plot_advice
    from ._panel import make_panel

    controls = dict(
        topology=W.Dropdown(options=["single-gpu", "h200-node", "pcie-node", "h200-2nodes", "h200-4nodes"],
                            value="h200-node", description="topology"),
        tokens=W.IntSlider(value=tokens, min=1, max=16384, step=1, description="tokens/step"),
        skew=W.FloatSlider(value=skew, min=0.0, max=3.0, step=0.25, description="skew"),
    )
    return make_panel(lambda **v: plot_advice(advice_cells(**v)), controls, rows=[["topology", "tokens", "skew"]])
