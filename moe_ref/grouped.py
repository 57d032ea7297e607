"""Grouped strategies: route -> group by expert -> permute -> contiguous per-expert GEMMs -> unpermute.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, N grouped rows.
"grouped":    one GEMM pair per non-empty expert on its contiguous block (Python loop over experts).
              `grouped_steps` runs the same steps and returns every intermediate (plan, xs, ys, y);
              `expert_blocks` is the one per-expert loop both use.
"grouped_mm": the same work in two calls of torch's grouped GEMM (F.grouped_mm / torch._grouped_mm),
              one group per expert, no loop. Its operands' strides must be multiples of 16 bytes,
              so D and F are zero-padded to that when they are not (exact: zeros add nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as Fn

from .grouping import DispatchPlan, group_by_expert
from .permute import permute, unpermute
from .reference import check_weights, expert_ffn, swiglu
from .router import Routing, validate_routing
from .strategy import StrategyResult, register_strategy


class GroupedSteps(NamedTuple):
    """The intermediates of the grouped pipeline for x [T, D]."""

    plan: DispatchPlan  # counts [E], offsets [E+1], row order
    xs: torch.Tensor  # [N, D] token rows grouped by expert
    ys: torch.Tensor  # [N, D] each row through its expert's FFN
    y: torch.Tensor  # [T, D] unpermuted, weighted combine over K


def expert_blocks(plan: DispatchPlan) -> Iterator[tuple[int, slice]]:
    """(e, rows) for each expert with work: rows = slice(offsets[e], offsets[e+1]) of the grouped order."""
    bounds = plan.offsets.tolist()  # [E+1]
    for e in range(plan.num_experts):
        if bounds[e + 1] > bounds[e]:
            yield e, slice(bounds[e], bounds[e + 1])


def grouped_ffn(xs: torch.Tensor, plan: DispatchPlan, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """ys [N, D]: each expert's FFN on its contiguous block of xs [N, D] (one GEMM pair per expert)."""
    ys = torch.empty_like(xs)  # [N, D]
    for e, rows in expert_blocks(plan):
        ys[rows] = expert_ffn(xs[rows], w13[e], w2[e])
    return ys


def _steps(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor, method: str) -> GroupedSteps:
    plan = group_by_expert(r.topk_ids, w13.shape[0], method=method)
    xs = permute(x, plan)  # [N, D]
    ys = grouped_ffn(xs, plan, w13, w2)  # [N, D]
    return GroupedSteps(plan, xs, ys, unpermute(ys, plan, r.topk_weights))


def grouped_steps(x2d: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor,
                  method: str = "argsort") -> GroupedSteps:
    """The "grouped" strategy on x2d [T, D] step by step: group (by `method`), permute, expert FFNs, unpermute.

    Returns GroupedSteps(plan, xs [N, D], ys [N, D], y [T, D]); y is bit for bit the strategy's output.
    Routing ids may be -1 (dropped): those assignments are skipped and contribute zero.
    """
    E, _, _ = check_weights(x2d, w13, w2)
    validate_routing(routing, x2d.shape[0], E, allow_dropped=True)
    return _steps(x2d, routing, w13, w2, method)


@register_strategy("grouped")
def grouped_moe(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor,
                capacity: int | None = None) -> StrategyResult:
    s = _steps(x, r, w13, w2, "argsort")
    return StrategyResult(s.y, computed_rows=s.plan.num_rows)


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
