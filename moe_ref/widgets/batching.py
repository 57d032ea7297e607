"""Notebook 02 helpers: sweeps of the dynamic-batching simulator, imbalance samples, and the panel.

Legend: T tokens in a batch, E experts, K top-k.
Everything runs moe_ref.simulate_dynamic_batching (Poisson arrivals, deterministic cost model) or
moe_ref.skew.random_routing; charts are the pure functions of moe_ref.plots.batching.
"""

from __future__ import annotations

__all__ = ["batching_sweep", "imbalance_samples", "batching_figure", "batching_panel"]


def batching_sweep(cfg, max_waits, max_batch_tokens, **sim_kwargs) -> list[dict]:
    """One row per (max_batch_tokens, max_wait): the simulation's latency and throughput numbers."""
    from ..batching import simulate_dynamic_batching

    rows = []
    for mbt in max_batch_tokens:
        for mw in max_waits:
            s = simulate_dynamic_batching(cfg, max_batch_tokens=mbt, max_wait=mw, **sim_kwargs)
            rows.append(dict(max_batch_tokens=mbt, max_wait=mw, p50_latency_s=s.p50_latency_s,
                             p99_latency_s=s.p99_latency_s, mean_latency_s=s.mean_latency_s,
                             throughput_tokens_per_s=s.throughput_tokens_per_s, batches=len(s.batches),
                             mean_batch_tokens=s.mean_batch_tokens, mean_load_imbalance=s.mean_load_imbalance,
                             worst_load_imbalance=s.worst_load_imbalance))
    return rows


def imbalance_samples(sizes, experts: int, top_k: int, trials: int = 50, skew: float = 0.0, seed: int = 0) -> dict:
    """{T: [max/mean expert load of `trials` independent random batches of T tokens]} (random_routing)."""
    from ..metrics import load_imbalance
    from ..skew import random_routing
    from ..stats import expert_counts

    out = {}
    for T in sizes:
        out[T] = [load_imbalance(expert_counts(random_routing(T, experts, top_k, skew=skew,
                                                              seed=seed + 1000 * i + T).topk_ids, experts))
                  for i in range(trials)]
    return out


def batching_figure(max_wait_ms: float = 2.0, max_batch_tokens: int = 256, arrival_rate: float = 500.0,
                    skew: float = 0.0, num_requests: int = 200, experts: int = 8, top_k: int = 2, seed: int = 0,
                    cost: dict | None = None):
    """plot_batching_timeline of one simulation (pure: arguments in, Figure out).

    cost: extra simulate_dynamic_batching arguments (cost model); default DEFAULT_COST.
    """
    from ..batching import simulate_dynamic_batching
    from ..config import MoEConfig
    from ..plots.batching import plot_batching_timeline

    cfg = MoEConfig(d_model=1024, d_ff=2048, num_experts=experts, top_k=min(top_k, experts))
    sim = simulate_dynamic_batching(cfg, arrival_rate=arrival_rate, num_requests=num_requests,
                                    max_batch_tokens=max_batch_tokens, max_wait=max_wait_ms / 1e3, skew=skew,
                                    seed=seed, **(cost or DEFAULT_COST))
    return plot_batching_timeline(sim)


# the cost model the notebook and panel use: 2 ms fixed per forward (weights streamed once per batch),
# expert FLOPs at 1 TFLOP/s; requests of 1..64 tokens.
DEFAULT_COST = dict(batch_overhead_s=2e-3, flops_per_s=1e12, request_len=(1, 64))


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
