"""Permutation: gather token rows into expert-grouped order, and back with a weighted combine.

Legend: T tokens, D d_model, K top-k, N grouped rows (kept assignments).
The combine is gather-and-reduce over the K slots of each token (no atomics, no scatter-add), so the same
input always gives bitwise the same output. It is one fused op, torch's embedding_bag in "sum" mode with
per-sample weights: each token is a bag of its kept grouped rows, weighted by its gate weights and summed in
float32 (float64 stays float64), with no [T, K, D] temporary. A dropped slot is simply not in its token's bag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from .grouping import DispatchPlan


def permute(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x [T, D] -> [N, D], row i = x[plan.token_ids[i]] (a token appears once per chosen expert)."""
    if x.dim() != 2 or x.shape[0] != plan.num_tokens:
        raise ValueError(f"x must be [T, D] with T={plan.num_tokens}, got {tuple(x.shape)}")
    return x.index_select(0, plan.token_ids)


def combine_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate the combine in float32 at least (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unpermute(ys: torch.Tensor, plan: DispatchPlan, topk_weights: torch.Tensor,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """ys [N, D] in grouped order -> y [T, D] = sum_k w[t, k] * ys[inverse[t*K + k]] over kept slots (dropped: 0).

    rows [N]: ys holds grouped row i at ys[rows[i]] instead (ys [M, D], any M; e.g. a padded layout).
    The weights are cast to ys's dtype (embedding_bag's rule); the products are summed in float32 at least.
    """
    T, K, N = plan.num_tokens, plan.top_k, plan.num_rows
    if rows is None and (ys.dim() != 2 or ys.shape[0] != N):
        raise ValueError(f"ys must be [N, D] with N={N}, got {tuple(ys.shape)}")
    if rows is not None and (ys.dim() != 2 or tuple(rows.shape) != (N,)):
        raise ValueError(f"with rows, ys must be [M, D] and rows [N] with N={N}, got {tuple(ys.shape)} and "
                         f"{tuple(rows.shape)}")
    if tuple(topk_weights.shape) != (T, K):
        raise ValueError(f"topk_weights must be [T, K] = [{T}, {K}], got {tuple(topk_weights.shape)}")
    dropped = N < T * K
    index = plan.inverse  # [S] row of ys of each slot, -1 where dropped
    if rows is not None and N:  # N = 0: every slot dropped, index is all -1 already (and rows has nothing to read)
        index = (torch.where(index >= 0, rows.index_select(0, index.clamp(min=0)), -1) if dropped
                 else rows.index_select(0, index))
    return combine_slots(ys, index, topk_weights, dropped=dropped)


def combine_slots(ys: torch.Tensor, slot_rows: torch.Tensor, topk_weights: torch.Tensor,
                  dropped: bool | None = None) -> torch.Tensor:
    """The combine on its own: y [T, D] = sum_k w[t, k] * ys[slot_rows[t*K + k]] over kept slots, from ys [M, D] (any
    rows: grouped, padded) and slot_rows [S = T*K], the row of ys that holds each slot's output, -1 where the slot
    was dropped (it adds nothing). dropped: whether any slot is (None: looked up). The same bags, in the same order,
    as unpermute: the same bits.
    """
    T, K = topk_weights.shape if topk_weights.dim() == 2 else (-1, -1)
    if topk_weights.dim() != 2 or tuple(slot_rows.shape) != (T * K,) or ys.dim() != 2:
        raise ValueError(f"combine_slots needs ys [M, D], slot_rows [T*K] and topk_weights [T, K], got "
                         f"{tuple(ys.shape)}, {tuple(slot_rows.shape)} and {tuple(topk_weights.shape)}")
    w = topk_weights.to(ys.dtype)  # [T, K]
    if dropped is None:
        dropped = bool((slot_rows < 0).any())
    if not dropped:  # T bags of exactly K rows
        return Fn.embedding_bag(slot_rows.view(T, K), ys, mode="sum", per_sample_weights=w)
    kept = slot_rows >= 0  # [S]
    offsets = torch.zeros(T, dtype=torch.long, device=ys.device)  # [T] start of each token's bag
    torch.cumsum(kept.view(T, K).sum(1)[:-1], 0, out=offsets[1:])
    return Fn.embedding_bag(slot_rows[kept], ys, offsets, mode="sum", per_sample_weights=w.reshape(-1)[kept])
