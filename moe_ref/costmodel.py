"""A hardware cost model of one MoE layer step: weight reads of the experts a step touches, its FLOPs, an overhead.

Legend: T tokens in the step, D d_model, F d_ff per expert, E experts, K top-k, H distinct experts touched,
el bytes per element, N kept assignments (T*K minus drops).

    time = max(bytes / bandwidth, FLOPs / peak) + step_overhead + expert_overhead * H
    bytes = H * 3*D*F*el (w13 [2F, D] and w2 [D, F] of every touched expert) + activations
    FLOPs = 6*D*F*N

The byte and FLOP counts are moe_ref.roofline's (expert_flops, weight_bytes, activation_bytes, expected_hit);
this module adds the overheads, a device profile, H and N read off a real Routing, the closed form for uniform
routing (E[H] = E * (1 - (1 - K/E)^T), exact: a token picks K distinct experts, so a given expert escapes it
with probability 1 - K/E, independently over tokens) and a simulation to check it against.
A dense model with the same active parameters (dense_equivalent: one FFN of width K*F) reads all of its
weights at every step, so it amortises them over far fewer tokens than an MoE, whose H keeps growing with T.

Profiles: H200 (the figures roofline.py names: ~4.3 TB/s and ~790 TFLOP/s dense bf16, measured by PyTorch on an
H200; NVIDIA's datasheet quotes 4.8 TB/s and 989 TFLOP/s; no overhead, since none was measured there) and
calibrate_cpu() (this CPU, measured now). validate_cost_model() compares predictions with the measured time of
the "grouped" strategy across T. Measuring uses moe_ref.bench.timing (torch.utils.benchmark).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from .roofline import (
    BF16_BYTES,
    H200_BF16_FLOPS,
    H200_HBM_BPS,
    ExpertShape,
    activation_bytes,
    as_shape,
    crossover_tokens,
    expected_hit,
    expert_flops,
    weight_bytes,
)
from .router import Routing
from .stats import expert_counts
from .validate import check_instance, check_int, check_number

__all__ = ["DeviceProfile", "H200", "calibrate_cpu", "dense_equivalent", "expected_step_cost", "knee_tokens",
           "routing_step_cost", "simulated_hit", "step_cost", "validate_cost_model"]


@dataclass(frozen=True)
class DeviceProfile:
    """What the cost model knows of a device.

    bandwidth_bps: bytes/s of weight and activation traffic; peak_flops: FLOP/s of the expert GEMMs;
    step_overhead_s: fixed cost of every step (launches, Python); expert_overhead_s: extra cost per touched
    expert (one GEMM pair launched per expert); elem_bytes: bytes per weight element (2 bf16, 4 fp32);
    source: where the numbers come from (a datasheet, a measurement, ...).
    """

    name: str
    bandwidth_bps: float
    peak_flops: float
    step_overhead_s: float = 0.0
    expert_overhead_s: float = 0.0
    elem_bytes: int = BF16_BYTES
    source: str = ""

    def __post_init__(self):
        check_number("bandwidth_bps", self.bandwidth_bps, 0, strict=True)
        check_number("peak_flops", self.peak_flops, 0, strict=True)
        check_number("step_overhead_s", self.step_overhead_s, 0)
        check_number("expert_overhead_s", self.expert_overhead_s, 0)
        check_int("elem_bytes", self.elem_bytes, 1)

    def replace(self, **changes) -> DeviceProfile:
        """A copy with some fields changed (e.g. an overhead of your own)."""
        return dataclasses.replace(self, **changes)


H200 = DeviceProfile("H200", H200_HBM_BPS, H200_BF16_FLOPS, elem_bytes=BF16_BYTES,
                     source="moe_ref.roofline's H200 figures (~4.3 TB/s device copy, ~790 TFLOP/s dense bf16 "
                            "matmul, as measured by PyTorch on an H200; datasheet: 4.8 TB/s, 989 TFLOP/s); "
                            "overheads 0: not measured")


def dense_equivalent(shape) -> ExpertShape:
    """A dense FFN with the MoE's active parameters: one expert of width K*F, always used (E = K = 1)."""
    s = as_shape(shape)
    return ExpertShape(f"{s.name}-dense", s.d_model, s.top_k * s.d_ff, 1, 1)


def step_cost(shape, num_tokens: int, hit: float, profile: DeviceProfile = H200, *,
              kept: float | None = None) -> dict:
    """The cost of one step of T tokens that touches `hit` distinct experts (H) with `kept` assignments (N).

    kept: assignments computed (default T*K: nothing dropped). Returns a dict: tokens, hit, kept, weight_bytes,
    activation_bytes, bytes, flops, memory_s, compute_s, overhead_s, time_s, binds ("memory" | "compute" | "none").
    """
    s = as_shape(shape)
    check_instance("profile", profile, DeviceProfile)
    T = check_int("num_tokens", num_tokens, 0)
    N = float(T * s.top_k) if kept is None else check_number("kept", kept, 0)
    if N > T * s.top_k:
        raise ValueError(f"kept must be <= T*K = {T * s.top_k}, got {kept}")
    check_number("hit", hit, 0)
    if hit > min(s.num_experts, N):
        raise ValueError(f"hit must be <= min(E, kept) = {min(s.num_experts, N):g} "
                         f"(T={T}, E={s.num_experts}, K={s.top_k}), got {hit}")
    el = profile.elem_bytes
    wb = weight_bytes(s, hit, el)
    ab = activation_bytes(s, T, el)
    fl = expert_flops(s, N / s.top_k)  # 6*D*F per kept assignment
    mem, comp = (wb + ab) / profile.bandwidth_bps, fl / profile.peak_flops
    over = (profile.step_overhead_s + profile.expert_overhead_s * hit) if T else 0.0
    return dict(tokens=T, hit=float(hit), kept=N, weight_bytes=wb, activation_bytes=ab, bytes=wb + ab, flops=fl,
                memory_s=mem, compute_s=comp, overhead_s=over, time_s=max(mem, comp) + over,
                binds="none" if T == 0 else ("memory" if mem >= comp else "compute"))


def routing_step_cost(shape, routing: Routing, profile: DeviceProfile = H200) -> dict:
    """step_cost of a real Routing: H = experts with at least one kept assignment, N = ids >= 0 (-1 = dropped)."""
    s = as_shape(shape)
    check_instance("routing", routing, Routing)
    ids = routing.topk_ids  # [T, K]
    if ids.shape[1] != s.top_k:
        raise ValueError(f"routing must be [T, K] with K={s.top_k}, got topk_ids {tuple(ids.shape)}")
    if ids.numel() and int(ids.max()) >= s.num_experts:
        raise ValueError(f"routing ids must be < E={s.num_experts}, got max id {int(ids.max())}")
    cnt = expert_counts(ids, s.num_experts)  # [E]
    return step_cost(s, ids.shape[0], int((cnt > 0).sum()), profile, kept=int(cnt.sum()))


def expected_step_cost(shape, num_tokens: int, profile: DeviceProfile = H200) -> dict:
    """step_cost under uniform routing, H = E[H] = E * (1 - (1 - K/E)^T) (the closed form)."""
    s = as_shape(shape)
    T = check_int("num_tokens", num_tokens, 0)
    return step_cost(s, T, expected_hit(T, s.num_experts, s.top_k), profile)


def simulated_hit(num_tokens: int, num_experts: int, top_k: int, trials: int = 200, seed: int = 0) -> dict:
    """Distinct experts touched by T tokens, each picking K distinct experts uniformly: {mean, std, trials}.

    Drawn as moe_ref.random_routing does with skew 0 (top-K of i.i.d. noise: a uniform K-subset per token).
    """
    T = check_int("num_tokens", num_tokens, 0)
    E = check_int("num_experts", num_experts, 1)
    K = check_int("top_k", top_k, 1, E)
    n = check_int("trials", trials, 1)
    g = torch.Generator().manual_seed(int(seed))
    ids = torch.rand(n, T, E, generator=g).topk(K, dim=-1).indices.reshape(n, T * K)  # [trials, T*K]
    hit = torch.zeros(n, E, dtype=torch.bool).scatter_(1, ids, True).sum(1).double() if T else torch.zeros(n)
    return dict(mean=float(hit.mean()), std=float(hit.std()) if n > 1 else 0.0, trials=n)


def knee_tokens(shape, profile: DeviceProfile = H200) -> float:
    """T* where compute time catches up with memory time under uniform routing (roofline.crossover_tokens)."""
    check_instance("profile", profile, DeviceProfile)
    return crossover_tokens(as_shape(shape), elem_bytes=profile.elem_bytes, hbm_bps=profile.bandwidth_bps,
                            matmul_flops=profile.peak_flops)


# ----------------------------------------------------------------------------------------- measured


def _time_s(fn, budget_ms: float) -> float:
    from .bench.timing import Timer

    fn()  # warm-up: allocator and caches
    return Timer("cpu", budget_ms=budget_ms)(fn)["median_ms"] * 1e-3


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op thread count set to n inside the block (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(check_int("threads", n, 1))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _tiny_grouped(experts: int, tokens: int, seed: int = 0):
    """fn() running strategy "grouped" on a tiny layer (D = F = 8, K = 1), and the experts it touches."""
    from .config import MoEConfig
    from .layer import MoELayer
    from .strategy import get_strategy

    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=experts, top_k=1), dtype=torch.float32, seed=seed)
    x = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(seed))  # [T, D]
    r = layer.route(x)
    fn = get_strategy("grouped")
    hit = int((expert_counts(r.topk_ids, experts) > 0).sum())
    return (lambda: fn(x, r, layer.w13, layer.w2)), hit


def calibrate_cpu(budget_ms: float = 100.0, copy_bytes: int = 1 << 27, matmul_n: int = 512,
                  dtype: torch.dtype = torch.float32, threads: int = 1) -> DeviceProfile:
    """This CPU's profile, measured now (about a second): bandwidth from a large copy and peak from a GEMM
    (moe_ref.bench.timing.measure_limits), and the overheads from the "grouped" strategy on a tiny layer
    (D = F = 8, so bytes and FLOPs are negligible): its time with 1 expert touched and with ~32 touched.

    threads: torch threads while measuring (1 by default: on a shared machine, more threads than free cores
    make OpenMP wait on each other and the numbers scatter). Use the same count in validate_cost_model.
    """
    from .bench.timing import Timer, measure_limits

    check_number("budget_ms", budget_ms, 0, strict=True)
    check_int("copy_bytes", copy_bytes, 1)
    check_int("matmul_n", matmul_n, 1)
    with _threads(threads), torch.inference_mode():
        lim = measure_limits(torch.device("cpu"), dtype, Timer("cpu", budget_ms=budget_ms), copy_bytes=copy_bytes,
                             matmul_sizes=(matmul_n,))
        one, h1 = _tiny_grouped(32, 1)
        many, hn = _tiny_grouped(32, 512)
        t1, tn = _time_s(one, budget_ms), _time_s(many, budget_ms)
    per_expert = max(0.0, (tn - t1) / max(hn - h1, 1))
    return DeviceProfile(
        "cpu", lim["copy_Bps"], lim["matmul_flops"], step_overhead_s=max(0.0, t1 - per_expert * h1),
        expert_overhead_s=per_expert, elem_bytes=torch.empty(0, dtype=dtype).element_size(),
        source=f"measured on this CPU ({threads} thread{'s' * (threads > 1)}): {copy_bytes >> 20} MiB copy, "
               f"{matmul_n}^3 {str(dtype).replace('torch.', '')} GEMM, 'grouped' on D=F=8 at 1 and {hn} experts")


def validate_cost_model(profile: DeviceProfile, tokens=(1, 4, 16, 64, 256, 1024), d_model: int = 512,
                        d_ff: int = 1024, num_experts: int = 8, top_k: int = 2, budget_ms: float = 100.0,
                        seed: int = 0, threads: int = 1, progress: bool = True) -> list[dict]:
    """The model's prediction against the measured "grouped" strategy time (float32 on this CPU), per T.

    Each T: random tokens through a seeded layer's router (a real Routing), its routing_step_cost and its
    measured median time (torch.utils.benchmark, `threads` torch threads). Rows: tokens, hit, predicted_s,
    measured_s, error (predicted / measured - 1), binds. No claim is made here; the caller reads the errors.
    """
    from tqdm.auto import tqdm

    from .config import MoEConfig
    from .layer import MoELayer
    from .strategy import get_strategy

    check_instance("profile", profile, DeviceProfile)
    cfg = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k)
    layer = MoELayer(cfg, dtype=torch.float32, seed=seed)
    fn = get_strategy("grouped")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for T in tqdm(list(tokens), desc="cost model vs grouped", disable=not progress):
        check_int("tokens", T, 1)
        x = torch.randn(T, d_model, generator=g)  # [T, D]
        with _threads(threads), torch.inference_mode():
            r = layer.route(x)
            measured = _time_s(lambda x=x, r=r: fn(x, r, layer.w13, layer.w2), budget_ms)
        pred = routing_step_cost(cfg, r, profile)
        rows.append(dict(tokens=T, hit=pred["hit"], predicted_s=pred["time_s"], measured_s=measured,
                         error=pred["time_s"] / measured - 1.0 if measured > 0 else math.inf, binds=pred["binds"]))
    return rows
