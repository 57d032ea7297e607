"""Permutation: gather token rows into expert-grouped order, and back with a weighted combine.

Legend: T tokens, D d_model, K top-k, N grouped rows (kept assignments).
The combine is gather-and-reduce over the K slots of each token (no atomics, no scatter-add),
so the same input always gives bitwise the same output. Two forms:
  unpermute(ys, plan, topk_weights): weights each row as it sums them (float32 accumulation);
  combine_rows(ys, plan):            rows already scaled by their gate weights (the grouped strategies
                                     fold the weight into the down projection), summed in one reduction.
"""

from __future__ import annotations

import torch

from .grouping import DispatchPlan


def permute(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x [T, D] -> [N, D], row i = x[plan.token_ids[i]] (a token appears once per chosen expert)."""
    if x.dim() != 2 or x.shape[0] != plan.num_tokens:
        raise ValueError(f"x must be [T, D] with T={plan.num_tokens}, got {tuple(x.shape)}")
    return x.index_select(0, plan.token_ids)


def combine_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate the combine in float32 at least (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unpermute(ys: torch.Tensor, plan: DispatchPlan, topk_weights: torch.Tensor) -> torch.Tensor:
    """ys [N, D] in grouped order -> y [T, D] = sum_k w[t, k] * ys[inverse[t*K + k]] (dropped: 0)."""
    T, K = plan.num_tokens, plan.top_k
    if ys.dim() != 2 or ys.shape[0] != plan.num_rows:
        raise ValueError(f"ys must be [N, D] with N={plan.num_rows}, got {tuple(ys.shape)}")
    if tuple(topk_weights.shape) != (T, K):
        raise ValueError(f"topk_weights must be [T, K] = [{T}, {K}], got {tuple(topk_weights.shape)}")
    acc = combine_dtype(ys.dtype)
    D = ys.shape[1]
    padded = torch.cat([ys, ys.new_zeros(1, D)])  # [N+1, D], row N is the zero row for dropped slots
    idx = torch.where(plan.inverse >= 0, plan.inverse, plan.num_rows)  # [S]
    slots = padded.index_select(0, idx).view(T, K, D).to(acc)  # [T, K, D]
    y = (slots * topk_weights.to(acc).unsqueeze(-1)).sum(1)  # [T, D]
    return y.to(ys.dtype)


def combine_rows(ys: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """ys [N, D] (or [N+1, D] with a zero row N) of rows already scaled by their gate weights -> y [T, D].

    y[t] = sum_k ys[inverse[t*K + k]]; a dropped slot reads row N, so ys must carry that zero row whenever
    the plan drops slots. One gather [T, K, D] in ys's dtype and one sum over K (torch accumulates a
    reduced-precision sum in float32), with no float32 [T, K, D] temporary.
    """
    T, K, N = plan.num_tokens, plan.top_k, plan.num_rows
    dropped = N < T * K
    if ys.dim() != 2 or ys.shape[0] != N + dropped:
        raise ValueError(f"ys must be [{N + dropped}, D] (N={N} rows{' + a zero row' if dropped else ''}), "
                         f"got {tuple(ys.shape)}")
    D = ys.shape[1]
    idx = torch.where(plan.inverse >= 0, plan.inverse, N) if dropped else plan.inverse  # [S]
    slots = ys.index_select(0, idx)  # [T*K, D]
    return slots if K == 1 else slots.view(T, K, D).sum(1)
