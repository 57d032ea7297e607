"""Experiment drivers of notebooks 02-06: sweeps and timings that return plain rows for moe_ref.plots.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, N grouped rows, C capacity per expert, P ranks.
Each driver runs library functions (the batching simulator, the grouping, the grouped pipeline's steps,
MoELayer with a CapacityConfig, the expert-parallel simulation) over a grid of settings and returns
lists or dicts of numbers; nothing here draws. Timings go through torch.utils.benchmark (`mean_seconds`).
"""

from __future__ import annotations

import torch
from torch.utils import benchmark

from .batching import simulate_dynamic_batching
from .config import CapacityConfig, MoEConfig
from .grouped import grouped_ffn, grouped_steps
from .grouping import GROUPING_METHODS, group_by_expert
from .layer import MoELayer
from .metrics import drop_share, load_imbalance, relative_error
from .parallel import simulate_ep, unique_destinations
from .permute import permute, unpermute
from .skew import random_routing
from .stats import expert_counts

__all__ = ["DEFAULT_COST", "mean_seconds", "batching_sweep", "imbalance_samples", "sort_times", "stage_times",
           "overflow_comparison", "ep_layer", "ep_inputs", "ep_imbalance_sweep", "comm_volume_sweep"]

# The cost model of notebook 02 and its panel: 2 ms fixed per forward (weights streamed once per batch),
# expert FLOPs at 1 TFLOP/s; requests of 1..64 tokens (extra simulate_dynamic_batching arguments).
DEFAULT_COST = dict(batch_overhead_s=2e-3, flops_per_s=1e12, request_len=(1, 64))


def mean_seconds(fn, reps: int = 5) -> float:
    """Seconds per call of fn(): torch.utils.benchmark's Timer.timeit(reps) (after its warm-up), this thread count."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(reps).mean


# ---------------------------------------------------------------- notebook 02: dynamic batching


def batching_sweep(cfg, max_waits, max_batch_tokens, **sim_kwargs) -> list[dict]:
    """One row per (max_batch_tokens, max_wait): the simulation's latency and throughput numbers."""
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
    out = {}
    for T in sizes:
        out[T] = [load_imbalance(expert_counts(random_routing(T, experts, top_k, skew=skew,
                                                              seed=seed + 1000 * i + T).topk_ids, experts))
                  for i in range(trials)]
    return out


# ---------------------------------------------------------------- notebooks 03-04: grouping and permutation


def sort_times(tokens, experts: int, top_k: int, skew: float = 0.0, reps: int = 5, seed: int = 0) -> dict:
    """{"argsort": [...], "counting": [...]}: seconds per group_by_expert call for each T in `tokens`."""
    out: dict[str, list[float]] = {m: [] for m in GROUPING_METHODS}
    for T in tokens:
        ids = random_routing(T, experts, top_k, skew=skew, seed=seed).topk_ids  # [T, K]
        for m in GROUPING_METHODS:
            out[m].append(mean_seconds(lambda m=m, ids=ids: group_by_expert(ids, experts, method=m), reps))
    return out


def stage_times(layer, x, reps: int = 5, warn: bool = True) -> dict:
    """Seconds per call (median) of each stage of the grouped pipeline (moe_ref.grouped) on x [T, D], in order.

    "permute" gathers the token rows; "unpermute + combine" gathers each token's K output rows back and sums
    them weighted by the gate weights, in one fused op.
    The stages are timed by the CPU harness (bench.timing.time_cpu: interleaved rounds, threads pinned);
    with `warn`, a stage whose spread says the machine is busy is named in a printed warning.
    """
    from .bench.timing import distrust, time_cpu, warn_if_busy

    E, w13, w2 = layer.cfg.num_experts, layer.w13, layer.w2
    with torch.inference_mode():
        r = layer.route(x)
        s = grouped_steps(x, r, w13, w2)  # plan, xs [N, D], ys [N, D], y [T, D]
        timed = time_cpu({
            "route": lambda: layer.route(x),
            "group": lambda: group_by_expert(r.topk_ids, E),
            "permute": lambda: permute(x, s.plan),
            "expert FFNs (contiguous blocks)": lambda: grouped_ffn(s.xs, s.plan, w13, w2),
            "unpermute + combine": lambda: unpermute(s.ys, s.plan, r.topk_weights),
        }, rounds=reps)
    if warn:
        warn_if_busy(distrust(timed), f"stage_times, T={x.shape[0]}")
    return {name: t["median_s"] for name, t in timed.items()}


# ---------------------------------------------------------------- notebook 05: capacity and overflow


def overflow_comparison(layer, x, routing, capacity_factor: float, drop_policy: str = "position",
                        strategy: str = "padded", overflows=("drop", "reroute", "spill", "dropless", "error"),
                        reps: int = 3) -> list[dict]:
    """One row per overflow strategy on the same routing of x [T, D]: error vs dropless, cost, or the error raised.

    Row: overflow, capacity, dropped, dropped_tokens, rerouted, passes, computed_rows, padded_slots,
    drop_share, rel_error (vs the dropless output), seconds (per forward), error (message or None), output.
    """
    with torch.inference_mode():
        base = layer(x, strategy=strategy, routing=routing).output  # dropless
        return [_overflow_row(layer, x, routing, base, strategy, reps,
                              CapacityConfig(capacity_factor=capacity_factor, drop_policy=drop_policy, overflow=ov))
                for ov in overflows]


def _overflow_row(layer, x, routing, base, strategy: str, reps: int, cap: CapacityConfig) -> dict:
    try:
        out = layer(x, strategy=strategy, routing=routing, capacity=cap)
    except ValueError as e:
        return dict(overflow=cap.overflow, error=str(e), rel_error=float("nan"), computed_rows=0, padded_slots=0,
                    passes=0, seconds=float("nan"), output=None)
    s = out.stats
    sec = mean_seconds(lambda: layer(x, strategy=strategy, routing=routing, capacity=cap), reps)
    return dict(overflow=cap.overflow, error=None, capacity=s.capacity, dropped=s.dropped,
                dropped_tokens=s.dropped_tokens, rerouted=s.rerouted, passes=s.passes,
                computed_rows=s.computed_rows, padded_slots=s.padded_slots, drop_share=drop_share(s),
                rel_error=relative_error(out.output, base), seconds=sec, output=out.output)


# ---------------------------------------------------------------- notebook 06: expert parallelism


def ep_layer(experts: int = 8, top_k: int = 2, d_model: int = 64, d_ff: int = 64, seed: int = 0) -> MoELayer:
    """A float32 MoELayer for the sweeps (small D, F: the traffic counts do not depend on them; bytes scale with D)."""
    return MoELayer(MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=experts, top_k=min(top_k, experts)), seed=seed)


def ep_inputs(layer, tokens: int, skew: float, seed: int):
    """(x [T, D] standard normal, a random_routing of T tokens with Zipf `skew`) for layer's D, E and K."""
    c = layer.cfg
    x = torch.randn(tokens, c.d_model, generator=torch.Generator().manual_seed(seed))  # [T, D]
    return x, random_routing(tokens, c.num_experts, c.top_k, skew=skew, seed=seed)


def ep_imbalance_sweep(layer, tokens_list, skews, world_size: int = 4, trials: int = 5, seed: int = 0,
                       progress: bool = False) -> list[dict]:
    """Per-rank load imbalance (max/mean rows computed per rank) for each (T, skew), over `trials` batches.

    Row: tokens, skew, world_size, imbalance (mean over trials), imbalance_max (worst trial).
    """
    cases = [(T, s) for s in skews for T in tokens_list]
    if progress:
        from tqdm.auto import tqdm

        cases = tqdm(cases, desc="EP imbalance sweep")
    rows = []
    for T, s in cases:
        imb = []
        for i in range(trials):
            x, r = ep_inputs(layer, T, s, seed + 1000 * i + T)
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
    E = layer.cfg.num_experts
    row_bytes = layer.cfg.d_model * layer.w13.element_size()
    rows = []
    for P in world_sizes:
        for s in skews:
            x, r = ep_inputs(layer, tokens, s, seed)
            g = simulate_ep(x, r, layer.w13, layer.w2, P)
            n = simulate_ep(x, r, layer.w13, layer.w2, P, scheme="naive")
            u = unique_destinations(r, E, P)  # [P, P]
            dedup = 2 * int(u.sum() - u.diagonal().sum()) * row_bytes
            rows.append(dict(world_size=P, skew=s, tokens=tokens, naive=n.link_bytes("tokens"),
                             grouped=g.link_bytes("tokens"), dedup=dedup, meta=g.link_bytes("meta")))
    return rows
