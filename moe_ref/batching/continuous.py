"""Iteration-level (continuous) batching with chunked prefill, against request-level batching, simulated.

Legend: T tokens in a step, P_i prompt tokens and O_i output tokens of request i, D d_model, F d_ff,
E experts, K top-k, H distinct experts a step touches, B the token budget of a step.

Both schedulers serve the same requests (Poisson arrivals, prompt and output lengths drawn from distributions),
price every step with moe_ref.costmodel (weight reads of the H experts the step's tokens really route to, against
its FLOPs, plus overheads) and record when each output token appears.

- continuous (vLLM, SGLang, TGI, transformers' generate_batch): every step runs one decode token of every running
  request plus prefill chunks of waiting prompts (at most chunk_size tokens of a prompt per step, None: whole
  prompts only), up to B tokens; a request joins at any step and leaves as soon as its O_i tokens are out.
- request-level (simulate_dynamic_batching's FlushRule, with B as max_batch_tokens): a batch of whole requests is
  formed, prefilled in one step, then decoded step by step until its longest output is done; only then does the
  next batch start.
A request's first output token comes from the step that finishes its prompt; each later one from one decode step
(so it is processed as a decode token in the next step). Tokens are routed once, in the order steps consume them
(random_routing with `skew`); dense=True prices the dense model with the same active parameters instead.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..config import MoEConfig
from ..costmodel import H200, DeviceProfile, dense_equivalent, step_cost
from ..skew import random_routing
from ..stats import expert_counts
from ..validate import check_choice, check_instance, check_int, check_number
from .flush import FlushRule
from .simulator import _draw_lengths, _next_batch, poisson_arrivals

__all__ = ["ServingSimulation", "draw_workload", "serving_comparison", "simulate_serving"]


@dataclass
class ServingSimulation:
    """Result of simulate_serving (times in simulated seconds).

    steps: one dict per step: index, start, end, time_s, tokens (T), decode_tokens, prefill_tokens, running
        (requests holding a slot), hit (H), weight_bytes (all layers), binds ("memory" | "compute").
    requests: one dict per request, in arrival order: arrival, prompt_len, output_len, prefilled, generated,
        token_times (when each output token appeared), first_token (s), finish (s).
    ttft_s: per request, first token minus arrival; itl_s: every gap between consecutive output tokens.
    metrics: ttft_p50_s, ttft_p99_s, itl_p50_s, itl_p99_s, throughput_tokens_per_s (generated tokens over the
        span from the first arrival to the last token), mean_tokens_per_step, mean_hit_per_step,
        weight_bytes_per_token (per generated token), steps, max_step_tokens.
    params: the arguments, for the record.
    """

    steps: list[dict]
    requests: list[dict]
    ttft_s: list[float]
    itl_s: list[float]
    metrics: dict
    params: dict


def draw_workload(num_requests: int, arrival_rate: float, prompt_len=(16, 256), output_len=(16, 128),
                  seed: int = 0) -> dict:
    """{arrivals, prompt_len, output_len}: Poisson arrivals and lengths (an int, (lo, hi), 'geometric:MEAN' or
    callable(generator) -> int, as simulate_dynamic_batching's request_len), all from one seeded generator."""
    n = check_int("num_requests", num_requests, 1)
    g = torch.Generator().manual_seed(int(seed))
    arrivals = poisson_arrivals(arrival_rate, n, g)
    try:
        prompts = _draw_lengths(prompt_len, n, g)
        outputs = _draw_lengths(output_len, n, g)
    except ValueError as e:
        raise ValueError(f"prompt_len / output_len: {e}") from None
    return dict(arrivals=arrivals, prompt_len=prompts, output_len=outputs)


class _Pricer:
    """Prices steps: consumes the pre-routed token pool in order, H from the step's real routing."""

    def __init__(self, cfg: MoEConfig, total: int, skew: float, seed: int, profile: DeviceProfile,
                 num_layers: int, dense: bool):
        self.shape = dense_equivalent(cfg) if dense else cfg
        self.E, self.dense, self.profile, self.layers = cfg.num_experts, dense, profile, num_layers
        self.ids = None if dense else torch.cat([random_routing(min(8192, total - lo), cfg.num_experts, cfg.top_k,
                                                                skew=skew, seed=seed + 1 + lo).topk_ids
                                                 for lo in range(0, max(total, 1), 8192)])  # [total, K]
        self.used = 0

    def __call__(self, tokens: int) -> dict:
        if self.dense:
            hit = 1 if tokens else 0
        else:
            cnt = expert_counts(self.ids[self.used:self.used + tokens], self.E)  # [E]
            hit = int((cnt > 0).sum())
        self.used += tokens
        c = step_cost(self.shape, tokens, hit, self.profile)
        return dict(time_s=c["time_s"] * self.layers, hit=hit, weight_bytes=c["weight_bytes"] * self.layers,
                    binds=c["binds"])


def _new_requests(w: dict) -> list[dict]:
    return [dict(arrival=a, prompt_len=p, output_len=o, prefilled=0, generated=0, token_times=[], first_token=None,
                 finish=None) for a, p, o in zip(w["arrivals"], w["prompt_len"], w["output_len"])]


def _emit(r: dict, t: float) -> bool:
    """Request r puts out one token at time t; True when that was its last."""
    r["generated"] += 1
    r["token_times"].append(t)
    if r["first_token"] is None:
        r["first_token"] = t
    if r["generated"] == r["output_len"]:
        r["finish"] = t
        return True
    return False


def _step(steps: list[dict], price: _Pricer, t: float, decodes: int, prefill: int, running: int) -> float:
    c = price(decodes + prefill)
    steps.append(dict(index=len(steps), start=t, end=t + c["time_s"], time_s=c["time_s"], tokens=decodes + prefill,
                      decode_tokens=decodes, prefill_tokens=prefill, running=running, hit=c["hit"],
                      weight_bytes=c["weight_bytes"], binds=c["binds"]))
    return t + c["time_s"]


def _continuous(reqs: list[dict], budget: int, chunk: int | None, max_running: int, price: _Pricer) -> list[dict]:
    steps, active, t, nxt, done = [], [], 0.0, 0, 0
    while done < len(reqs):
        if not active and reqs[nxt]["arrival"] > t:
            t = reqs[nxt]["arrival"]  # idle until the next request arrives
        while nxt < len(reqs) and reqs[nxt]["arrival"] <= t and len(active) < max_running:
            active.append(reqs[nxt])
            nxt += 1
        decoding = [r for r in active if r["prefilled"] == r["prompt_len"]]
        left, takes = budget - len(decoding), []
        for r in active:  # prefill chunks, first come first served
            rest = r["prompt_len"] - r["prefilled"]
            if rest == 0 or left == 0:
                continue
            take = min(rest, left, chunk or rest)
            if chunk is None and take < rest:
                break  # whole prompts only: this one waits for room, and so does everyone after it
            takes.append((r, take))
            left -= take
        t = _step(steps, price, t, len(decoding), sum(n for _, n in takes), len(active))
        finished = [r for r in decoding if _emit(r, t)]
        for r, n in takes:
            r["prefilled"] += n
            if r["prefilled"] == r["prompt_len"] and _emit(r, t):
                finished.append(r)
        done += len(finished)
        active = [r for r in active if r["finish"] is None]
    return steps


def _request_level(reqs: list[dict], budget: int, max_wait: float, price: _Pricer) -> list[dict]:
    rule = FlushRule(budget, max_wait)
    arrivals, prompts = [r["arrival"] for r in reqs], [r["prompt_len"] for r in reqs]
    offsets = list(itertools.accumulate(prompts, initial=0))
    steps, free, i = [], 0.0, 0
    while i < len(reqs):
        start, _, j = _next_batch(rule, arrivals, prompts, offsets, i, free)
        batch = reqs[i:j]
        t = _step(steps, price, start, 0, offsets[j] - offsets[i], len(batch))
        for r in batch:
            r["prefilled"] = r["prompt_len"]
            _emit(r, t)
        live = [r for r in batch if r["finish"] is None]
        while live:  # the batch holds its slots until its longest output is done
            t = _step(steps, price, t, len(live), 0, len(batch))
            live = [r for r in live if not _emit(r, t)]
        free, i = t, j
    return steps


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else 0.0


def simulate_serving(cfg: MoEConfig, mode: str = "continuous", num_requests: int = 100, arrival_rate: float = 50.0,
                     prompt_len=(16, 256), output_len=(16, 128), token_budget: int = 512,
                     chunk_size: int | None = 256, max_running: int | None = None, max_wait: float = 0.0,
                     profile: DeviceProfile = H200, num_layers: int = 1, dense: bool = False, skew: float = 0.0,
                     seed: int = 0) -> ServingSimulation:
    """Serve one workload (draw_workload with num_requests, arrival_rate, the lengths and seed) step by step.

    cfg: the MoE layer's shape (MoEConfig: D, F, E, K). mode: "continuous" | "request" (see the module doc).
    token_budget: B, the most tokens a step may hold (request mode: the FlushRule's max_batch_tokens).
    chunk_size: continuous only: the most prompt tokens of one request per step (None: whole prompts; then B must
        hold the longest prompt, as in request mode). max_running: continuous only: requests holding a slot at
        once (default B, so the decodes alone never exceed B). max_wait: request only: the FlushRule's max_wait.
    profile: the DeviceProfile the steps are priced on; num_layers: MoE layers per step (time and bytes scale).
    dense: price the dense model with the same active parameters (costmodel.dense_equivalent) instead.
    """
    check_instance("cfg", cfg, MoEConfig)
    check_choice("mode", mode, ("continuous", "request"))
    B = check_int("token_budget", token_budget, 1)
    check_instance("profile", profile, DeviceProfile)
    check_int("num_layers", num_layers, 1)
    check_number("max_wait", max_wait, 0)
    check_number("skew", skew, 0)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    running = B if max_running is None else check_int("max_running", max_running, 1, B)
    w = draw_workload(num_requests, arrival_rate, prompt_len, output_len, seed)
    longest = max(w["prompt_len"])
    if (mode == "request" or chunk_size is None) and longest > B:
        raise ValueError(f"token_budget={B} cannot hold the longest prompt ({longest} tokens) without chunked "
                         "prefill: raise token_budget or use mode='continuous' with a chunk_size")
    reqs = _new_requests(w)
    total = sum(w["prompt_len"]) + sum(w["output_len"]) - len(reqs)  # prompt tokens + decode tokens
    price = _Pricer(cfg, total, skew, int(seed), profile, num_layers, dense)
    steps = _continuous(reqs, B, chunk_size, running, price) if mode == "continuous" else \
        _request_level(reqs, B, max_wait, price)
    ttft = [r["first_token"] - r["arrival"] for r in reqs]
    itl = [b - a for r in reqs for a, b in zip(r["token_times"], r["token_times"][1:])]
    generated = sum(r["generated"] for r in reqs)
    span = max(r["finish"] for r in reqs) - reqs[0]["arrival"]
    metrics = dict(ttft_p50_s=_pct(ttft, 0.5), ttft_p99_s=_pct(ttft, 0.99), itl_p50_s=_pct(itl, 0.5),
                   itl_p99_s=_pct(itl, 0.99), throughput_tokens_per_s=generated / span if span > 0 else math.inf,
                   mean_tokens_per_step=sum(s["tokens"] for s in steps) / len(steps),
                   mean_hit_per_step=sum(s["hit"] for s in steps) / len(steps),
                   weight_bytes_per_token=sum(s["weight_bytes"] for s in steps) / generated, steps=len(steps),
                   max_step_tokens=max(s["tokens"] for s in steps))
    params = dict(mode=mode, num_requests=num_requests, arrival_rate=arrival_rate, prompt_len=repr(prompt_len),
                  output_len=repr(output_len), token_budget=B, chunk_size=chunk_size, max_running=running,
                  max_wait=max_wait, profile=profile.name, num_layers=num_layers, dense=dense, skew=skew, seed=seed,
                  d_model=cfg.d_model, d_ff=cfg.d_ff, num_experts=cfg.num_experts, top_k=cfg.top_k)
    return ServingSimulation(steps, reqs, ttft, itl, metrics, params)


def serving_comparison(cfg: MoEConfig, **kwargs) -> list[dict]:
    """simulate_serving for continuous and request-level batching, MoE and its dense equivalent, on one workload.

    kwargs go to simulate_serving (mode and dense excepted). Rows: mode, model ("moe" | "dense") and the metrics.
    """
    if "mode" in kwargs or "dense" in kwargs:
        raise ValueError("serving_comparison sets mode and dense itself; pass the other simulate_serving arguments")
    rows = []
    for dense in (False, True):
        for mode in ("continuous", "request"):
            sim = simulate_serving(cfg, mode=mode, dense=dense, **kwargs)
            rows.append(dict(mode=mode, model="dense" if dense else "moe", **sim.metrics))
    return rows
