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
from .permute import combine_rows, permute
from .reference import check_weights, swiglu
from .router import Routing, validate_routing
from .strategy import StrategyResult, register_strategy


class GroupedSteps(NamedTuple):
    """The intermediates of the grouped pipeline for x [T, D]."""

    plan: DispatchPlan  # counts [E], offsets [E+1], row order
    xs: torch.Tensor  # [N, D] token rows grouped by expert
    ws: torch.Tensor  # [N, 1] gate weight of each grouped row, in x's dtype
    ys: torch.Tensor  # [N, D] each row through its expert's FFN, times its gate weight
    y: torch.Tensor  # [T, D] each token's K rows of ys summed (combine_rows)


def expert_blocks(plan: DispatchPlan) -> Iterator[tuple[int, slice]]:
    """(e, rows) for each expert with work: rows = slice(offsets[e], offsets[e+1]) of the grouped order."""
    bounds = plan.offsets.tolist()  # [E+1]
    for e in range(plan.num_experts):
        if bounds[e + 1] > bounds[e]:
            yield e, slice(bounds[e], bounds[e + 1])


def expert_ffn_into(xe: torch.Tensor, w13_e: torch.Tensor, w2_e: torch.Tensor, out: torch.Tensor,
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """out [n, D] = expert_ffn(xe [n, D]) (* scale [n, 1]), with no copy beyond the [n, 2F] and [n, F] GEMM inputs.

    The down GEMM writes straight into `out` (a row block of the caller's buffer), SwiGLU multiplies in
    place into silu(gate), and the gate weight scales the output rows in place: the same bits as
    expert_ffn(xe, w13_e, w2_e) * scale. Under autograd (an input requiring grad, grad mode on), where
    out= and in-place steps are not allowed, it computes the same out of place and copies it into `out`.
    """
    F = w2_e.shape[1]
    if needs_grad(xe, w13_e, w2_e, scale):
        y = swiglu(xe @ w13_e.t()) @ w2_e.t()  # [n, D]
        return out.copy_(y if scale is None else y * scale)
    h = torch.mm(xe, w13_e.t())  # [n, 2F]: gate | up
    a = Fn.silu(h[:, :F])  # [n, F]
    a.mul_(h[:, F:])
    torch.mm(a, w2_e.t(), out=out)  # [n, D]
    if scale is not None:
        out.mul_(scale)
    return out


def needs_grad(*ts: torch.Tensor | None) -> bool:
    """True when autograd records: grad mode on and some tensor requires grad (then no out= or in-place)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def gate_weights(r: Routing, plan: DispatchPlan, dtype: torch.dtype) -> torch.Tensor:
    """[N, 1] the gate weight of each grouped row (topk_weights in grouped order), in `dtype`."""
    return r.topk_weights.reshape(-1).index_select(0, plan.sorted_slots).to(dtype).unsqueeze(1)


def row_buffer(plan: DispatchPlan, like: torch.Tensor, width: int) -> torch.Tensor:
    """An [N, width] output buffer, with one extra zero row N when the plan drops slots (combine_rows reads it)."""
    N = plan.num_rows
    dropped = N < plan.num_tokens * plan.top_k
    buf = like.new_empty(N + dropped, width)
    if dropped:
        buf[N].zero_()
    return buf


def grouped_ffn(xs: torch.Tensor, plan: DispatchPlan, w13: torch.Tensor, w2: torch.Tensor,
                ws: torch.Tensor | None = None) -> torch.Tensor:
    """ys [N(+1), D]: each expert's FFN on its contiguous block of xs [N, D], rows scaled by ws [N, 1] if given.

    One GEMM pair per expert, written in place into one buffer (row_buffer: a zero row N when slots are dropped).
    """
    ys = row_buffer(plan, xs, w2.shape[1])  # [N(+1), D]
    for e, rows in expert_blocks(plan):
        expert_ffn_into(xs[rows], w13[e], w2[e], ys[rows], None if ws is None else ws[rows])
    return ys


def _steps(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor, method: str) -> GroupedSteps:
    plan = group_by_expert(r.topk_ids, w13.shape[0], method=method)
    xs = permute(x, plan)  # [N, D]
    ws = gate_weights(r, plan, x.dtype)  # [N, 1]
    ys = grouped_ffn(xs, plan, w13, w2, ws)  # [N(+1), D], gate weights folded in
    return GroupedSteps(plan, xs, ws, ys[: plan.num_rows], combine_rows(ys, plan))


def grouped_steps(x2d: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor,
                  method: str = "argsort") -> GroupedSteps:
    """The "grouped" strategy on x2d [T, D] step by step: group (by `method`), permute, expert FFNs, combine.

    Returns GroupedSteps(plan, xs [N, D], ws [N, 1], ys [N, D], y [T, D]); y is bit for bit the strategy's
    output. Each expert's output rows are scaled by their gate weights as they are written (the weight
    folded into the down projection), so the combine is a plain sum of each token's K rows.
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
    Dp, Fp = w13p.shape[2], w2p.shape[2]
    xs = permute(x, plan)  # [N, D]
    if Dp != D:
        xs = Fn.pad(xs, (0, Dp - D))  # [N, Dp]
    offs = plan.offsets[1:].to(torch.int32)  # [E] end row of each expert's group
    h = gmm(xs, w13p.transpose(1, 2), offs=offs)  # [N, 2Fp]: gate | up
    ws = gate_weights(r, plan, x.dtype)  # [N, 1]
    if needs_grad(x, w13, w2, ws):  # autograd: the same steps out of place
        ys = gmm(swiglu(h), w2p.transpose(1, 2), offs=offs) * ws  # [N, Dp]
    else:
        a = Fn.silu(h[:, :Fp])  # [N, Fp], SwiGLU in place
        a.mul_(h[:, Fp:])
        ys = gmm(a, w2p.transpose(1, 2), offs=offs)  # [N, Dp]
        ys.mul_(ws)  # the gate weight folded into the output rows
    if Dp != D or plan.num_rows < plan.num_tokens * plan.top_k:  # a zero row N for dropped slots
        out = row_buffer(plan, ys, D)
        out[: plan.num_rows] = ys[:, :D]
        ys = out
    return StrategyResult(combine_rows(ys, plan), computed_rows=plan.num_rows)
