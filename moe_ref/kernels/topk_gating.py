"""Fused top-k gating: softmax (or sigmoid) in fp32, top-k, optional renormalisation, in one kernel.

Legend: T tokens, E experts, K top-k.
One program takes BLOCK_T rows of the router logits [T, E], scores them in fp32, then picks the
K largest by K rounds of "take the row maximum, lowest index on ties, knock it out" (what
torch.topk returns, sorted by score), and writes topk_ids [T, K] and topk_weights [T, K].
Equal to moe_ref.route on the same logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ref.config import check_top_k

from .backend import cdiv, next_pow2, require_backend


@triton.jit
def _topk_gating_kernel(
    logits_ptr,  # [T, E] router logits (any float dtype; scored in fp32)
    ids_ptr,  # [T, K] int64 out: chosen experts, best first
    weights_ptr,  # [T, K] fp32 out: their gate weights
    num_tokens,  # T
    num_experts,  # E
    stride_lt,  # logits row stride (elements)
    TOP_K: tl.constexpr,  # K
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_E: tl.constexpr,  # next power of two >= E
    BLOCK_K: tl.constexpr,  # next power of two >= K
    SIGMOID: tl.constexpr,  # score with sigmoid instead of softmax
    RENORMALIZE: tl.constexpr,  # divide the K weights by their sum
):
    pid = tl.program_id(0).to(tl.int64)  # widened before it is scaled: offsets are int64 (compile_check)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :]
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)  # rows past T: finite junk, never stored (avoids NaN warnings)
    if SIGMOID:
        p = tl.sigmoid(x)  # [BLOCK_T, BLOCK_E]
    else:
        z = tl.exp(x - tl.max(x, axis=1)[:, None])  # [BLOCK_T, BLOCK_E]; padded columns give 0
        p = z / tl.sum(z, axis=1)[:, None]
    p = tl.where(col_ok[None, :], p, -1.0)  # padded columns never win
    kcol = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)  # [BLOCK_T]
        idx = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), axis=1)  # lowest index on ties
        top_w = tl.where(kcol[None, :] == k, best[:, None], top_w)
        top_i = tl.where(kcol[None, :] == k, idx[:, None], top_i)
        p = tl.where(cols[None, :] == idx[:, None], -2.0, p)  # knock the winner out
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]  # padded K columns hold 0
    out = rows.to(tl.int64)[:, None] * TOP_K + kcol[None, :]  # [BLOCK_T, BLOCK_K]
    mask = row_ok[:, None] & (kcol[None, :] < TOP_K)
    tl.store(ids_ptr + out, top_i.to(tl.int64), mask=mask)
    tl.store(weights_ptr + out, top_w, mask=mask)


def topk_gating(logits: torch.Tensor, top_k: int, renormalize: bool = True,
                scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids [T, K] int64, topk_weights [T, K] fp32) from router logits [T, E]; no host sync."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating [T, E] tensor, got {getattr(logits, 'shape', logits)}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    T, E = logits.shape
    check_top_k(top_k, E)
    require_backend(logits)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, weights
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block_e = next_pow2(E)
    block_t = max(1, min(64, 4096 // block_e))
    _topk_gating_kernel[(cdiv(T, block_t),)](
        logits, ids, weights, T, E, logits.stride(0), TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=next_pow2(top_k), SIGMOID=scoring == "sigmoid", RENORMALIZE=bool(renormalize))
    return ids, weights


def topk_gating_torch(logits: torch.Tensor, top_k: int, renormalize: bool = True,
                      scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of topk_gating (the rule of moe_ref.route)."""
    s = logits.float()
    p = torch.softmax(s, -1) if scoring == "softmax" else torch.sigmoid(s)  # [T, E]
    w, ids = torch.topk(p, top_k, dim=-1)  # [T, K]
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return ids, w
