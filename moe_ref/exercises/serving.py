"""Exercises of notebook 02b (continuous batching): experts a step touches, one step's schedule, TTFT and ITL.

Legend: T tokens in a step, E experts, K top-k, H distinct experts a step touches, B the token budget of a step,
P_i the prompt tokens request i still has to prefill.
Each check_* compares the reader's function with moe_ref's own: `expected_hit` (moe_ref/roofline.py), the
continuous scheduler of `simulate_serving` (moe_ref/batching/continuous.py) run for one step, and the TTFT and
ITL of `simulate_serving` on small workloads.
"""

from __future__ import annotations

import functools

import torch

from ..batching import simulate_serving
from ..batching.continuous import _continuous
from ..config import MoEConfig
from ..roofline import expected_hit
from ._runner import Case, CheckResult, run_check

__all__ = ["check_expected_hit", "check_step_schedule", "check_ttft_itl"]


def _int_list_as_tensor(fn):
    """fn, with a returned list (or tuple) of ints turned into an int64 tensor, so the report can index it."""
    if not callable(fn):
        return fn  # run_check refuses it

    @functools.wraps(fn)
    def wrapped(*args):
        got = fn(*args)
        if isinstance(got, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in got):
            return torch.tensor(list(got), dtype=torch.long)
        return got

    return wrapped


def check_expected_hit(fn, verbose: bool = True) -> CheckResult:
    """fn(num_tokens, num_experts, top_k) -> float: E[H] = E · (1 − (1 − K/E)^T) under uniform top-K routing.

    A token picks K distinct experts, so a given expert escapes it with probability 1 − K/E, independently over
    tokens. T = 0 touches nothing; K = E touches every expert from the first token.
    """
    grid = [  # (name, T, E, K)
        ("decode step T=1: exactly K", 1, 128, 8),
        ("T=64, E=128, K=8", 64, 128, 8),
        ("T=0 (empty step)", 0, 64, 8),
        ("E=1, K=1", 5, 1, 1),
        ("K=E=4", 3, 4, 4),
        ("large step T=4096: H close to E", 4096, 256, 8),
        ("odd sizes T=13, E=7, K=3", 13, 7, 3),
        ("Mixtral E=8, K=2, T=2", 2, 8, 2),
    ]
    cases = [Case(name, dict(num_tokens=T, num_experts=E, top_k=K), float(expected_hit(T, E, K)),
                  rtol=1e-9, atol=1e-12) for name, T, E, K in grid]
    return run_check("check_expected_hit", fn, cases, verbose=verbose,
                     hint="E * (1 - (1 - K / E) ** T); T = 0 gives 0.0.")


class _OneStep(Exception):
    """Stops the scheduler once its first step is done."""


def _first_step_takes(prompt_left: list[int], decoding: int, budget: int, chunk: int | None) -> list[int]:
    """Prompt tokens of each waiting request the continuous scheduler puts into its next step.

    Runs moe_ref's scheduler itself: `decoding` requests already decoding, then the waiting prompts (P_i tokens
    left each), all present at t = 0; the pricer stops it when the second step is about to run.
    """
    def req(prompt, prefilled, generated):
        return dict(arrival=0.0, prompt_len=prompt, output_len=10**9, prefilled=prefilled, generated=generated,
                    token_times=[0.0] * generated, first_token=0.0 if generated else None, finish=None)

    running = [req(4, 4, 1) for _ in range(decoding)]
    waiting = [req(p, 0, 0) for p in prompt_left]
    steps = []

    def price(tokens: int) -> dict:
        if steps:
            raise _OneStep
        steps.append(tokens)
        return dict(time_s=1.0, hit=0, weight_bytes=0.0, binds="none")

    try:
        _continuous(running + waiting, budget, chunk, max(1, len(running) + len(waiting)), price)
    except _OneStep:
        pass
    return [r["prefilled"] for r in waiting]


def check_step_schedule(fn, verbose: bool = True) -> CheckResult:
    """fn(prompt_left: list[int], decoding, token_budget, chunk_size) -> list[int]: one step's prefill takes.

    A step holds one token of each of the `decoding` running requests (decoding <= B), then prefill tokens of the
    waiting prompts, first come first served, until the step holds B tokens: request i gets
    min(P_i, room left, chunk_size). With chunk_size None (whole prompts only) a prompt that does not fit whole
    gets nothing, and neither does any prompt after it. Returns the tokens taken from each prompt, in order.
    """
    grid = [  # (name, prompt_left, decoding, B, chunk)
        ("decodes + two chunks", [300, 500, 40], 12, 512, 256),
        ("decodes fill the budget", [64, 64], 8, 8, 256),
        ("no waiting prompt: a decode-only step", [], 5, 64, 256),
        ("nothing decoding, one short prompt", [17], 0, 64, 256),
        ("whole prompts: the first does not fit, nobody after it runs", [100, 3], 2, 64, None),
        ("whole prompts that fit", [10, 20, 30], 4, 64, None),
        ("the last prompt gets what is left", [30, 30, 30], 0, 70, 32),
        ("chunk 1", [5, 5, 5], 1, 16, 1),
        ("chunk larger than the budget", [1000], 3, 128, 4096),
        ("a prompt exactly the room left", [61, 9], 3, 64, 64),
    ]
    cases = [Case(name, dict(prompt_left=list(p), decoding=d, token_budget=B, chunk_size=c),
                  torch.tensor(_first_step_takes(p, d, B, c), dtype=torch.long))
             for name, p, d, B, c in grid]
    return run_check("check_step_schedule", _int_list_as_tensor(fn), cases, verbose=verbose,
                     hint="room = B - decoding; walk the prompts: take = min(P_i, room, chunk or P_i); "
                          "with chunk None and take < P_i, stop (everyone after waits too).")


def _ttft_case(name: str, **kw) -> Case:
    cfg = MoEConfig(d_model=2048, d_ff=768, num_experts=128, top_k=8)  # a Qwen3-30B-A3B expert layer
    sim = simulate_serving(cfg, num_layers=48, **kw)  # steps of milliseconds on the H200 profile
    args = dict(arrivals=[r["arrival"] for r in sim.requests],
                token_times=[list(r["token_times"]) for r in sim.requests])
    return Case(name, args, (torch.tensor(sim.ttft_s, dtype=torch.float64), float(sim.metrics["itl_p99_s"])),
                parts=("ttft", "itl_p99"), rtol=1e-9, atol=1e-15)


def check_ttft_itl(fn, verbose: bool = True) -> CheckResult:
    """fn(arrivals: list[float], token_times: list[list[float]]) -> (ttft [N] float64, itl_p99: float).

    Request i arrives at arrivals[i] and puts out its tokens at token_times[i] (seconds, increasing; the first
    one ends its prefill). TTFT_i = first token − arrival. The inter-token latencies are the gaps between
    consecutive tokens of a request, over all requests; itl_p99 is their nearest-rank 99th percentile:
    sorted(gaps)[ceil(0.99 · n) − 1], 0.0 when there is no gap. Compared with simulate_serving's own.
    """
    cases = [
        _ttft_case("8 requests, continuous", num_requests=8, arrival_rate=50.0, prompt_len=(16, 200),
                   output_len=(2, 12), token_budget=256, chunk_size=64),
        _ttft_case("one request", num_requests=1, prompt_len=40, output_len=5, token_budget=64),
        _ttft_case("one output token each: no gap at all", num_requests=5, prompt_len=(8, 30), output_len=1,
                   token_budget=64),
        _ttft_case("request-level batching", mode="request", num_requests=10, arrival_rate=200.0,
                   prompt_len=(8, 60), output_len=(1, 9), token_budget=128),
        _ttft_case("whole prompts, no chunking", num_requests=12, arrival_rate=100.0, prompt_len=(16, 128),
                   output_len=(3, 20), token_budget=160, chunk_size=None),
        _ttft_case("long prompts, chunk 16", num_requests=6, arrival_rate=20.0, prompt_len=(100, 300),
                   output_len=(4, 8), token_budget=48, chunk_size=16, seed=3),
        _ttft_case("idle server: far-apart arrivals", num_requests=4, arrival_rate=0.5, prompt_len=(4, 12),
                   output_len=(2, 4), token_budget=32, seed=5),
    ]
    return run_check("check_ttft_itl", fn, cases, verbose=verbose,
                     hint="ttft: token_times[i][0] - arrivals[i]; gaps: b - a over zip(times, times[1:]); "
                          "p99: sorted(gaps)[math.ceil(0.99 * len(gaps)) - 1].")
