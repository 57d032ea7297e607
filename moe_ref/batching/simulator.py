"""The dynamic-batching simulator: Poisson arrivals, the batcher's FlushRule, a deterministic cost model
(linear in the rows, or moe_ref.costmodel's hardware model).

Legend: T tokens in a batch, L_i tokens of request i, D d_model, F d_ff, E experts, K top-k.
Every token is really routed (random_routing, or random tokens through a layer's router), so each
simulated batch has the expert loads a real batch of those requests would see.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import torch

from ..config import MoEConfig
from ..costmodel import H200, DeviceProfile, step_cost
from ..layer import MoELayer
from ..metrics import coefficient_of_variation, load_imbalance
from ..skew import random_routing, skewed_routing
from ..stats import expert_counts
from ..validate import check_choice, check_instance, check_int, check_number
from .flush import FlushRule

__all__ = ["BatchingSimulation", "poisson_arrivals", "simulate_dynamic_batching"]


@dataclass
class BatchingSimulation:
    """Result of simulate_dynamic_batching (times in simulated seconds).

    batches: one dict per batch: index, first_request (its requests are first_request ..
        first_request + num_requests - 1), start (s), end (s), num_requests, num_tokens,
        reason ("full": max_batch_tokens were queued by the start, else "timeout"), compute_s,
        expert_counts [E] list, load_imbalance (max/mean), cv (std/mean of expert loads), max_load, mean_load.
    latencies: per request, completion time minus arrival time (s), in arrival order.
    arrivals, lengths: per request, arrival time (s) and tokens L_i, in arrival order.
    throughput_tokens_per_s: tokens served / (last completion - first arrival).
    mean_latency_s, p50_latency_s, p99_latency_s: over requests.
    mean_batch_tokens: average tokens per batch; mean_load_imbalance: average over batches;
    worst_load_imbalance: the largest max/mean seen in any batch (no guarantee: it can stay high).
    params: the arguments, for the record.
    """

    batches: list[dict]
    latencies: list[float]
    arrivals: list[float]
    lengths: list[int]
    throughput_tokens_per_s: float
    mean_latency_s: float
    p50_latency_s: float
    p99_latency_s: float
    mean_batch_tokens: float
    mean_load_imbalance: float
    worst_load_imbalance: float
    params: dict


def poisson_arrivals(arrival_rate: float, n: int, g: torch.Generator) -> list[float]:
    """n arrival times (s) of a Poisson process of `arrival_rate` per second: cumulative exponential gaps."""
    check_number("arrival_rate", arrival_rate, 0, strict=True)
    gaps = torch.empty(n, dtype=torch.float64).exponential_(arrival_rate, generator=g)
    return torch.cumsum(gaps, 0).tolist()


def _draw_lengths(request_len, n: int, g: torch.Generator) -> list[int]:
    if isinstance(request_len, int) and not isinstance(request_len, bool):
        if request_len < 1:
            raise ValueError(f"request_len must be >= 1, got {request_len}")
        return [request_len] * n
    if isinstance(request_len, tuple) and len(request_len) == 2:
        lo, hi = request_len
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"request_len (lo, hi) must be ints with 1 <= lo <= hi, got {request_len}")
        return torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    if isinstance(request_len, str) and request_len.startswith("geometric:"):
        mean = float(request_len.split(":", 1)[1])
        if not mean >= 1:
            raise ValueError(f"request_len 'geometric:MEAN' needs MEAN >= 1, got {mean}")
        u = torch.rand(n, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        p = 1.0 / mean
        return (torch.floor(torch.log(u) / math.log1p(-p)) + 1).long().tolist() if p < 1 else [1] * n
    if callable(request_len):
        out = [int(request_len(g)) for _ in range(n)]
        if min(out, default=1) < 1:
            raise ValueError("request_len() must return ints >= 1")
        return out
    raise ValueError("request_len must be an int, a (lo, hi) tuple of ints, 'geometric:MEAN', "
                     f"or a callable(generator) -> int; got {request_len!r}")


def simulate_dynamic_batching(layer_or_cfg, arrival_rate: float, num_requests: int, max_batch_tokens: int,
                              max_wait: float, request_len=(1, 64), seed: int = 0, skew: float = 0.0,
                              time_per_row_s: float | None = None, batch_overhead_s: float = 1e-4,
                              cost: str = "sum", flops_per_s: float = 1e11, profile=None) -> BatchingSimulation:
    """Simulate the DynamicBatcher's flush rule on Poisson arrivals, with a deterministic cost model.

    layer_or_cfg: a MoELayer (its router routes random tokens, biased by `skew` via skewed_routing)
        or a MoEConfig (tokens routed by random_routing with `skew`). Either way loads are real
        top-k routings of every token, so per-batch expert loads are what a real batch would see.
    arrival_rate: requests per second (Poisson: exponential gaps). num_requests: how many.
    request_len: int, (lo, hi) uniform ints, "geometric:MEAN", or callable(torch.Generator) -> int.
    Flush rule (FlushRule, as DynamicBatcher): one server; a batch starts when the server is free and either
        max_batch_tokens are queued or max_wait passed since its oldest request; it takes whole
        requests in arrival order up to max_batch_tokens.
    Cost model (deterministic): compute_s = batch_overhead_s + time_per_row_s * rows, where
        rows = T*K ("sum": experts run one after another) or E * max expert load ("max": experts
        run in parallel, so the busiest one sets the pace: imbalance costs time). time_per_row_s
        defaults to 6*D*F / flops_per_s (one token through one SwiGLU expert).
        cost="model": the hardware cost model instead (moe_ref.costmodel.step_cost on `profile`, a
        DeviceProfile, default H200): weight reads of the experts the batch touches vs its FLOPs, plus the
        profile's overheads (batch_overhead_s, time_per_row_s and flops_per_s are not used).
    """
    if not isinstance(layer_or_cfg, (MoELayer, MoEConfig)):
        raise TypeError(f"layer_or_cfg must be a MoELayer or MoEConfig, got {type(layer_or_cfg).__name__}")
    cfg = layer_or_cfg.cfg if isinstance(layer_or_cfg, MoELayer) else layer_or_cfg
    check_number("arrival_rate", arrival_rate, 0, strict=True)
    check_int("num_requests", num_requests, low=1)
    rule = FlushRule(max_batch_tokens, max_wait)
    check_choice("cost", cost, ("sum", "max", "model"))
    if cost == "model":
        profile = H200 if profile is None else check_instance("profile", profile, DeviceProfile)
    E, K = cfg.num_experts, cfg.top_k
    per_row = time_per_row_s if time_per_row_s is not None else cfg.expert_flops_per_row() / flops_per_s

    g = torch.Generator().manual_seed(int(seed))
    arrivals = poisson_arrivals(arrival_rate, num_requests, g)  # [N] seconds
    lengths = _draw_lengths(request_len, num_requests, g)
    ids = _route_tokens(layer_or_cfg, sum(lengths), skew, g, int(seed))  # [sum L, K]
    offsets = list(itertools.accumulate(lengths, initial=0))  # request i owns tokens offsets[i]:offsets[i+1]

    batches, free, i = [], 0.0, 0  # server free time, next request not yet batched
    while i < num_requests:
        start, reason, j = _next_batch(rule, arrivals, lengths, offsets, i, free)
        tokens = offsets[j] - offsets[i]
        cnt = expert_counts(ids[offsets[i]:offsets[j]], E)  # [E]
        if cost == "model":
            compute = step_cost(cfg, tokens, int((cnt > 0).sum()), profile)["time_s"]
        else:
            compute = batch_overhead_s + per_row * (tokens * K if cost == "sum" else E * int(cnt.max()))
        batches.append(dict(index=len(batches), first_request=i, start=start, end=start + compute,
                            num_requests=j - i, num_tokens=tokens, reason=reason, compute_s=compute,
                            expert_counts=cnt.tolist(), load_imbalance=load_imbalance(cnt),
                            cv=coefficient_of_variation(cnt), max_load=int(cnt.max()),
                            mean_load=float(cnt.double().mean())))
        free, i = start + compute, j
    params = dict(arrival_rate=arrival_rate, num_requests=num_requests, max_batch_tokens=max_batch_tokens,
                  max_wait=max_wait, request_len=repr(request_len), seed=seed, skew=skew, cost=cost,
                  time_per_row_s=per_row, batch_overhead_s=batch_overhead_s, num_experts=E, top_k=K,
                  profile=profile.name if cost == "model" else None)
    return _summarize(batches, arrivals, lengths, params)


def _route_tokens(layer_or_cfg, total: int, skew: float, g: torch.Generator, seed: int) -> torch.Tensor:
    """topk_ids [total, K]: random tokens through a layer's router biased by `skew`, or random_routing."""
    if isinstance(layer_or_cfg, MoEConfig):
        c = layer_or_cfg
        return random_routing(total, c.num_experts, c.top_k, skew=skew, seed=seed + 1).topk_ids
    cfg, w = layer_or_cfg.cfg, layer_or_cfg.router_weight  # w [E, D]
    chunks = []
    with torch.inference_mode():
        for lo in range(0, total, 8192):
            x = torch.randn(min(8192, total - lo), cfg.d_model, generator=g).to(w.dtype).to(w.device)  # [n, D]
            chunks.append(skewed_routing(x, w, cfg.top_k, skew, renormalize=cfg.renormalize,
                                         scoring=cfg.scoring).topk_ids.cpu())
    return torch.cat(chunks)


def _next_batch(rule: FlushRule, arrivals: list[float], lengths: list[int], offsets: list[int], i: int,
                free: float) -> tuple[float, str, int]:
    """(start, reason, j): the batch of requests i..j-1 that the rule dispatches, the server being free at `free`.

    Steps through the events a live worker wakes on (arrivals, the oldest request's deadline) from
    max(free, arrivals[i]) until the rule gives a reason.
    """
    t = max(free, arrivals[i])
    while True:
        n = bisect.bisect_right(arrivals, t)  # requests arrived by t
        reason = rule.reason(offsets[n] - offsets[i], arrivals[i], t)
        if reason is not None:
            return t, reason, i + rule.take(lengths[i:n])
        t = min(arrivals[n] if n < len(arrivals) else math.inf, rule.deadline(arrivals[i]))


def _summarize(batches: list[dict], arrivals: list[float], lengths: list[int], params: dict) -> BatchingSimulation:
    done = [0.0] * len(arrivals)  # completion time of each request
    for b in batches:
        done[b["first_request"]:b["first_request"] + b["num_requests"]] = [b["end"]] * b["num_requests"]
    lat = [d - a for d, a in zip(done, arrivals)]
    lat_sorted = sorted(lat)

    def pct(q):
        return lat_sorted[min(len(lat_sorted) - 1, max(0, math.ceil(q * len(lat_sorted)) - 1))]

    span = max(done) - arrivals[0]
    imbs = [b["load_imbalance"] for b in batches]
    total = sum(lengths)
    return BatchingSimulation(
        batches=batches, latencies=lat, arrivals=arrivals, lengths=lengths,
        throughput_tokens_per_s=total / span if span > 0 else math.inf,
        mean_latency_s=sum(lat) / len(lat), p50_latency_s=pct(0.5), p99_latency_s=pct(0.99),
        mean_batch_tokens=total / len(batches), mean_load_imbalance=sum(imbs) / len(imbs),
        worst_load_imbalance=max(imbs), params=params)
