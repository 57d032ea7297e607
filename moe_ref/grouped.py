"""Grouped strategies: route -> group by expert -> permute -> contiguous per-expert GEMMs -> unpermute.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, N grouped rows.
"grouped":    one GEMM pair per non-empty expert on its contiguous block (Python loop over experts).
"grouped_mm": the same work in two calls of torch's grouped GEMM (F.grouped_mm / torch._grouped_mm),
              one group per expert, no loop. Its operands' strides must be multiples of 16 bytes,
              so D and F are zero-padded to that when they are not (exact: zeros add nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from .grouping import group_by_expert
from .permute import permute, unpermute
from .reference import swiglu
from .router import Routing
from .strategy import StrategyResult, register_strategy


@register_strategy("grouped")
def grouped_moe(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor,
                capacity: int | None = None) -> StrategyResult:
    plan = group_by_expert(r.topk_ids, w13.shape[0])
    xs = permute(x, plan)  # [N, D] grouped by expert
    ys = torch.empty_like(xs)  # [N, D]
    bounds = plan.offsets.tolist()
    for e in range(w13.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            ys[lo:hi] = swiglu(xs[lo:hi] @ w13[e].t()) @ w2[e].t()
    return StrategyResult(unpermute(ys, plan, r.topk_weights), computed_rows=plan.num_rows)


def grouped_mm_fn():
    """torch's grouped GEMM, or None when this torch has none."""
    return getattr(Fn, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_expert_weights(w13: torch.Tensor, w2: torch.Tensor, multiple: int):
    """Zero-pad D and F up to `multiple` elements: w13 [E, 2F, D] -> [E, 2Fp, Dp], w2 -> [E, Dp, Fp]."""
    E, F2, D = w13.shape
    F = F2 // 2
    Dp, Fp = _pad_to(D, multiple), _pad_to(F, multiple)
    if (Dp, Fp) == (D, F):
        return w13, w2
    w13p = w13.new_zeros(E, 2 * Fp, Dp)
    w13p[:, :F, :D] = w13[:, :F]  # gate rows
    w13p[:, Fp:Fp + F, :D] = w13[:, F:]  # up rows (padded gate rows give silu(0)*0 = 0)
    w2p = w2.new_zeros(E, Dp, Fp)
    w2p[:, :D, :F] = w2
    return w13p, w2p


@register_strategy("grouped_mm")
def grouped_mm_moe(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor,
                   capacity: int | None = None) -> StrategyResult:
    gmm = grouped_mm_fn()
    if gmm is None:
        raise RuntimeError(f"strategy 'grouped_mm' needs torch.nn.functional.grouped_mm or torch._grouped_mm, "
                           f"which torch {torch.__version__} lacks; use strategy='grouped'")
    if x.dtype not in GROUPED_MM_DTYPES:
        raise TypeError(f"strategy 'grouped_mm' supports {GROUPED_MM_DTYPES}, got {x.dtype}; "
                        "use strategy='grouped' for float64")
    E, D = w13.shape[0], x.shape[1]
    plan = group_by_expert(r.topk_ids, E)
    if plan.num_rows == 0:
        return StrategyResult(torch.zeros_like(x), computed_rows=0)
    multiple = 16 // x.element_size()  # 16-byte stride rule
    w13p, w2p = pad_expert_weights(w13, w2, multiple)
    Dp = w13p.shape[2]
    xs = permute(x, plan)  # [N, D]
    if Dp != D:
        xs = Fn.pad(xs, (0, Dp - D))  # [N, Dp]
    offs = plan.offsets[1:].to(torch.int32)  # [E] end row of each expert's group
    h = gmm(xs, w13p.transpose(1, 2), offs=offs)  # [N, 2Fp]
    ys = gmm(swiglu(h), w2p.transpose(1, 2), offs=offs)  # [N, Dp]
    return StrategyResult(unpermute(ys[:, :D].contiguous(), plan, r.topk_weights), computed_rows=plan.num_rows)
