"""Naive batching: feed the whole batch to the MoE layer without regrouping tokens.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
"dense": every expert runs on every token and a [T, E] weight mask picks the K that count:
         E/K times the useful FLOPs, but one big uniform GEMM per expert.
"loop":  per expert, select its tokens with a boolean mask and run only those (the Hugging Face
         eager block): no wasted FLOPs, but E small, irregular GEMMs and a host sync per expert.
Routing ids of -1 (dropped by capacity) contribute nothing in both.
"""

from __future__ import annotations

import torch

from .permute import combine_dtype
from .reference import swiglu
from .router import Routing
from .strategy import StrategyResult, register_strategy


@register_strategy("dense")
def dense_moe(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor,
              capacity: int | None = None) -> StrategyResult:
    T, E = x.shape[0], w13.shape[0]
    acc = combine_dtype(x.dtype)
    valid = r.topk_ids >= 0  # [T, K]
    gate = torch.zeros(T, E, dtype=acc, device=x.device)  # [T, E] combine weights, 0 if not chosen
    gate.scatter_add_(1, r.topk_ids.clamp(min=0), torch.where(valid, r.topk_weights.to(acc), 0))
    h = torch.einsum("td,efd->etf", x, w13)  # [E, T, 2F]
    out = torch.einsum("etf,edf->etd", swiglu(h), w2)  # [E, T, D]
    y = torch.einsum("te,etd->td", gate, out.to(acc))  # [T, D]
    return StrategyResult(y.to(x.dtype), computed_rows=T * E)


@register_strategy("loop")
def loop_moe(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor,
             capacity: int | None = None) -> StrategyResult:
    acc = combine_dtype(x.dtype)
    y = torch.zeros(x.shape, dtype=acc, device=x.device)  # [T, D]
    rows = 0
    for e in range(w13.shape[0]):
        tok, k = torch.where(r.topk_ids == e)  # [n], [n] (host sync, as in HF eager)
        if tok.numel() == 0:
            continue
        out = swiglu(x[tok] @ w13[e].t()) @ w2[e].t()  # [n, D]
        y.index_add_(0, tok, out.to(acc) * r.topk_weights[tok, k, None].to(acc))
        rows += tok.numel()
    return StrategyResult(y.to(x.dtype), computed_rows=rows)
