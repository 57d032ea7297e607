"""Roofline lower bound of one MoE expert layer on a device: HBM traffic time vs tensor-core time.

Legend: T tokens, D d_model, F d_ff per expert, E experts, K top-k, H distinct experts hit, el bytes per element.

A prediction, pure arithmetic (no device is touched): the layer cannot finish faster than
max(bytes / HBM bandwidth, FLOPs / matmul rate). Counted per forward of the expert FFNs (router excluded):

- FLOPs of useful work: 6*D*F*T*K (w13 [2F, D] and w2 [D, F] per assignment, 2 FLOPs per multiply-add);
- weight bytes touched: H * 3*D*F*el, every hit expert's w13 and w2 read once. Under uniform routing
  E[H] = E * (1 - (1 - K/E)^T): a token picks K distinct experts, so a given expert escapes it with
  probability exactly 1 - K/E, independently over tokens;
- activation bytes: x [T, D] read and y [T, D] written once; the SwiGLU output [T*K, F] written by the
  first GEMM and read by the second (the two GEMMs are separate kernels, as in moe_ref.kernels:
  intermediate=False drops it, for a kernel that keeps it on chip); routing ids [T, K] int64 and
  weights [T, K] float32 read once. moe_ref.kernels' per-slot output buffer [T*K, D] (written by the
  second GEMM, read by the combine) is an implementation choice and is not counted: this bounds any
  implementation of the layer.

The device figures are named once below: measured by PyTorch on an H200, ~790 TFLOP/s dense bf16 matmul
and ~4.3 TB/s device copy. Every function takes them as overridable keyword arguments.
`python -m moe_ref.roofline` prints the H200 table in markdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import check_top_k
from .validate import check_int, check_number

__all__ = ["H200_HBM_BPS", "H200_BF16_FLOPS", "BF16_BYTES", "TOKEN_COUNTS", "ExpertShape", "MODEL_SHAPES",
           "as_shape", "expected_hit", "expert_flops", "weight_bytes", "activation_bytes", "roofline_point",
           "roofline_table", "crossover_tokens", "markdown_table", "main"]

H200_HBM_BPS = 4.3e12  # bytes/s: measured by PyTorch on an H200, ~4.3 TB/s device copy
H200_BF16_FLOPS = 790e12  # FLOP/s: measured by PyTorch on an H200, ~790 TFLOP/s dense bf16 matmul
BF16_BYTES = 2
ID_BYTES, GATE_BYTES = 8, 4  # routing: topk_ids int64, topk_weights float32
TOKEN_COUNTS = (1, 4, 16, 64, 256, 1024, 4096, 16384)  # decode through prefill


@dataclass(frozen=True)
class ExpertShape:
    """The expert-layer shape a roofline needs: D, F, E, K (same field names as moe_ref.bench's Shape)."""

    name: str
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int

    def __post_init__(self):
        for field in ("d_model", "d_ff", "num_experts"):
            check_int(field, getattr(self, field), 1)
        check_top_k(self.top_k, self.num_experts)


MODEL_SHAPES = (  # names as in moe_ref.bench.SHAPES
    ExpertShape("mixtral-8x7b", 4096, 14336, 8, 2),
    ExpertShape("qwen3-30b-a3b", 2048, 768, 128, 8),
    ExpertShape("olmoe-1b-7b", 2048, 1024, 64, 8),
    ExpertShape("deepseek-v3-routed", 7168, 2048, 256, 8),
)


def as_shape(shape) -> ExpertShape:
    """An ExpertShape from anything with d_model, d_ff, num_experts, top_k (and optionally name)."""
    if isinstance(shape, ExpertShape):
        return shape
    missing = [f for f in ("d_model", "d_ff", "num_experts", "top_k") if not hasattr(shape, f)]
    if missing:
        raise TypeError(f"shape must have d_model, d_ff, num_experts, top_k; {type(shape).__name__} lacks {missing}")
    name = getattr(shape, "name", None) or f"D{shape.d_model}-F{shape.d_ff}-E{shape.num_experts}-K{shape.top_k}"
    return ExpertShape(name, shape.d_model, shape.d_ff, shape.num_experts, shape.top_k)


def expected_hit(num_tokens: float, num_experts: int, top_k: int) -> float:
    """E[H] = E * (1 - (1 - K/E)^T): distinct experts hit by T tokens under uniform top-K routing.

    num_tokens may be a real number >= 0 (the crossover search evaluates between token counts).
    """
    check_number("num_tokens", num_tokens, 0)
    check_int("num_experts", num_experts, 1)
    check_top_k(top_k, num_experts)
    if num_tokens == 0:
        return 0.0
    return num_experts * -math.expm1(num_tokens * math.log1p(-top_k / num_experts)) if top_k < num_experts \
        else float(num_experts)


def expert_flops(shape, num_tokens: float) -> float:
    """Useful FLOPs of the expert FFNs: 6*D*F*T*K."""
    s = as_shape(shape)
    check_number("num_tokens", num_tokens, 0)
    return 6.0 * s.d_model * s.d_ff * num_tokens * s.top_k


def _check_hit(s: ExpertShape, num_tokens: float, hit) -> float:
    check_number("hit", hit, 0)
    hi = min(s.num_experts, num_tokens * s.top_k)
    lo = min(s.top_k, hi)  # one token already touches K distinct experts
    if not lo <= hit <= hi:
        raise ValueError(f"hit must be in [{lo}, {hi}] for T={num_tokens}, E={s.num_experts}, K={s.top_k}, got {hit}")
    return float(hit)


def weight_bytes(shape, hit: float, elem_bytes: int = BF16_BYTES) -> float:
    """Expert weight bytes read: hit * 3*D*F*el (w13 [2F, D] and w2 [D, F] of every hit expert)."""
    s = as_shape(shape)
    check_number("hit", hit, 0)
    if hit > s.num_experts:
        raise ValueError(f"hit must be <= num_experts={s.num_experts}, got {hit}")
    check_int("elem_bytes", elem_bytes, 1)
    return hit * 3.0 * s.d_model * s.d_ff * elem_bytes


def activation_bytes(shape, num_tokens: float, elem_bytes: int = BF16_BYTES, *, intermediate: bool = True) -> float:
    """x [T, D] in, y [T, D] out, SwiGLU output [T*K, F] written + read (intermediate=True), routing [T, K]."""
    s = as_shape(shape)
    check_number("num_tokens", num_tokens, 0)
    check_int("elem_bytes", elem_bytes, 1)
    T, K = num_tokens, s.top_k
    xy = 2.0 * T * s.d_model * elem_bytes  # [T, D] read + [T, D] written
    mid = 2.0 * T * K * s.d_ff * elem_bytes if intermediate else 0.0  # [T*K, F] written + read
    return xy + mid + T * K * (ID_BYTES + GATE_BYTES)  # + ids and weights [T, K]


def roofline_point(shape, num_tokens: int, *, hit: float | None = None, elem_bytes: int = BF16_BYTES,
                   hbm_bps: float = H200_HBM_BPS, matmul_flops: float = H200_BF16_FLOPS,
                   intermediate: bool = True) -> dict:
    """The lower bound at T tokens: both limits (µs), the bound, which binds ("hbm" or "matmul").

    hit: distinct experts touched (a measured or explicit count); None = E[H] under uniform routing.
    Also returns tflops (the best useful TFLOP/s any kernel could reach there), weight_share
    (the share of the bound time spent streaming expert weights) and the parameters it was computed with.
    """
    s = as_shape(shape)
    T = check_int("num_tokens", num_tokens, 0)
    check_number("hbm_bps", hbm_bps, 0, strict=True)
    check_number("matmul_flops", matmul_flops, 0, strict=True)
    h = expected_hit(T, s.num_experts, s.top_k) if hit is None else _check_hit(s, T, hit)
    wb, ab, fl = weight_bytes(s, h, elem_bytes), activation_bytes(s, T, elem_bytes, intermediate=intermediate), \
        expert_flops(s, T)
    hbm_s, mm_s = (wb + ab) / hbm_bps, fl / matmul_flops
    bound_s = max(hbm_s, mm_s)
    return dict(shape=s.name, d_model=s.d_model, d_ff=s.d_ff, num_experts=s.num_experts, top_k=s.top_k,
                elem_bytes=elem_bytes, hbm_bps=hbm_bps, matmul_flops=matmul_flops, intermediate=intermediate,
                tokens=T, hit=h, weight_bytes=wb, activation_bytes=ab, flops=fl,
                hbm_us=hbm_s * 1e6, matmul_us=mm_s * 1e6, bound_us=bound_s * 1e6,
                binds="none" if T == 0 else ("hbm" if hbm_s >= mm_s else "matmul"),
                tflops=fl / bound_s / 1e12 if bound_s else 0.0,
                weight_share=wb / hbm_bps / bound_s if bound_s else 0.0)


def roofline_table(shapes=MODEL_SHAPES, tokens=TOKEN_COUNTS, **kwargs) -> list[dict]:
    """roofline_point for every shape x token count (uniform routing), rows in that order."""
    return [roofline_point(s, T, **kwargs) for s in shapes for T in tokens]


def _gap(s: ExpertShape, T: float, elem_bytes: int, hbm_bps: float, matmul_flops: float, intermediate: bool) -> float:
    """Matmul time minus HBM time (s) at real T, uniform routing: < 0 where HBM binds."""
    hbm = weight_bytes(s, expected_hit(T, s.num_experts, s.top_k), elem_bytes) + \
        activation_bytes(s, T, elem_bytes, intermediate=intermediate)
    return expert_flops(s, T) / matmul_flops - hbm / hbm_bps


def crossover_tokens(shape, *, elem_bytes: int = BF16_BYTES, hbm_bps: float = H200_HBM_BPS,
                     matmul_flops: float = H200_BF16_FLOPS, intermediate: bool = True) -> float:
    """T* >= 1 (real) where the two limits meet under uniform routing: HBM binds below, matmul above.

    The HBM time is concave in T (E[H] saturates at E) and the matmul time linear, so they cross at most
    once past T=1. Returns 1.0 if matmul binds from the first token, math.inf if it never does.
    """
    s = as_shape(shape)
    check_number("hbm_bps", hbm_bps, 0, strict=True)
    check_number("matmul_flops", matmul_flops, 0, strict=True)
    args = (elem_bytes, hbm_bps, matmul_flops, intermediate)
    if _gap(s, 1.0, *args) >= 0:
        return 1.0
    lo, hi = 1.0, 2.0
    while _gap(s, hi, *args) < 0:
        lo, hi = hi, hi * 2
        if hi > 2.0**62:
            return math.inf
    for _ in range(200):  # bisection; stops once the interval no longer shrinks
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _gap(s, mid, *args) < 0 else (lo, mid)
    return hi


def markdown_table(rows: list[dict]) -> str:
    """Predicted µs and binding limit as a markdown table: one row per token count, one column per shape."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    tokens = sorted({r["tokens"] for r in rows})
    cell = {(r["shape"], r["tokens"]): f"{r['bound_us']:,.1f} ({r['binds']})" for r in rows}
    lines = ["| T | " + " | ".join(shapes) + " |", "|---:|" + "---:|" * len(shapes)]
    lines += [f"| {T} | " + " | ".join(cell.get((s, T), "") for s in shapes) + " |" for T in tokens]
    return "\n".join(lines)


def main() -> None:
    """`python -m moe_ref.roofline`: the H200 table of MODEL_SHAPES x TOKEN_COUNTS and each crossover T*."""
    print(markdown_table(roofline_table()))
    print()
    for s in MODEL_SHAPES:
        print(f"{s.name}: crossover T* = {crossover_tokens(s):.0f}")


if __name__ == "__main__":
    main()
