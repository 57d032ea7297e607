"""Block-aligned grouping on the device: which slots each M-block of the grouped GEMMs works on.

Legend: T tokens, K top-k, E experts, S = T*K slots (slot s = t*K + k), BLOCK_M rows per tile.
Counting sort, as in vLLM's moe_align_block_size, built from four small kernels:
  1. count:   per chunk of slots, a one-hot [chunk, E] -> per-expert counts of the chunk and each
              slot's rank among the earlier slots of its chunk with the same expert;
  2. scan:    per expert, an exclusive prefix sum over the chunks -> where each chunk starts
              inside that expert's group, and the expert's total count;
  3. offsets: counts rounded up to BLOCK_M, prefix sum over experts -> each expert's first row,
              the padded total, and the expert id of every M-block (-1 past the end);
  4. scatter: each slot goes to row  expert start + chunk start + rank.
Rows not filled hold the sentinel S (padding lives only in this index array). Within an expert,
slots keep token order, so the rows match moe_ref.group_by_expert. Dropped slots (id -1) are
skipped. Every buffer has a size known from shapes alone, so nothing waits for the device.
Row and slot ids are int32 (align_block_size checks that the padded length stays below 2^31);
offsets into the buffers are formed in int64 all the same (program ids widened before they are
scaled), as compile_check demands.
For few slots (decode) the same four steps run in ONE program (_align_one_program_kernel): two
passes over the slots, no buffer fills, one launch instead of three fills and four kernels, which
is most of the alignment's cost when a step moves a few hundred bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe_ref.grouping import group_by_expert

from .backend import cdiv, next_pow2, require_backend


@dataclass
class AlignedPlan:
    """The grouped-row layout the fused GEMMs read.

    sorted_slot_ids: [max_padded] int32 slot of each grouped row; S (= T*K) marks a padding row.
    expert_ids:      [max_padded // BLOCK_M] int32 expert of each M-block; -1 for unused blocks.
    num_padded:      [1] int32 (device) rows actually used: sum over experts of counts rounded up.
    """

    sorted_slot_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    block_m: int
    num_tokens: int
    top_k: int

    @property
    def sentinel(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def max_padded(self) -> int:
        return self.sorted_slot_ids.shape[0]


def max_padded_rows(num_slots: int, num_experts: int, block_m: int) -> int:
    """Static upper bound of the padded length: every non-empty expert wastes < BLOCK_M rows."""
    return num_slots + min(num_slots, num_experts) * (block_m - 1) if num_slots else 0


def _check(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be a [T, K] tensor, got {getattr(topk_ids, 'shape', topk_ids)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a positive power of two, got {block_m!r}")


# ---------------------------------------------------------------------------------------- kernels

@triton.jit
def _count_kernel(
    topk_ids_ptr,  # [S] expert id of each slot (int32 or int64); -1 = dropped
    rank_ptr,  # [S] int32 out: rank of the slot among earlier slots of its chunk with the same expert
    chunk_counts_ptr,  # [E, num_chunks] int32 out: slots of each expert in each chunk
    num_slots,  # S = T*K
    num_chunks,  # cdiv(S, BLOCK_S)
    num_experts,  # E
    BLOCK_S: tl.constexpr,  # slots per chunk (one program per chunk)
    BLOCK_E: tl.constexpr,  # next power of two >= E
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S] int64 slot ids
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)  # [BLOCK_S]
    experts = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK_S, BLOCK_E]; -1 matches nothing
    before = tl.cumsum(onehot, axis=0) - onehot  # [BLOCK_S, BLOCK_E] earlier slots per expert
    rank = tl.sum(before * onehot, axis=1)  # [BLOCK_S]
    tl.store(rank_ptr + offs, rank, mask=offs < num_slots)
    counts = tl.sum(onehot, axis=0)  # [BLOCK_E]
    tl.store(chunk_counts_ptr + experts.to(tl.int64) * num_chunks + pid, counts, mask=experts < num_experts)


@triton.jit
def _scan_kernel(
    chunk_counts_ptr,  # [E, num_chunks] int32: slots of each expert in each chunk
    chunk_offsets_ptr,  # [E, num_chunks] int32 out: exclusive prefix sum over chunks, per expert
    counts_ptr,  # [E] int32 out: slots of each expert (dropped ones excluded)
    num_chunks,  # chunks of slots
    BLOCK_C: tl.constexpr,  # chunks scanned per step
):
    e = tl.program_id(0).to(tl.int64)  # one program per expert
    carry = tl.sum(tl.zeros([BLOCK_C], dtype=tl.int32), axis=0)  # running total (scalar)
    for c0 in range(0, num_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
        n = tl.load(chunk_counts_ptr + e * num_chunks + c, mask=c < num_chunks, other=0)  # [BLOCK_C]
        incl = tl.cumsum(n, axis=0)  # [BLOCK_C]
        tl.store(chunk_offsets_ptr + e * num_chunks + c, carry + incl - n, mask=c < num_chunks)
        carry += tl.sum(n, axis=0)
    tl.store(counts_ptr + e, carry)


@triton.jit
def _offsets_kernel(
    counts_ptr,  # [E] int32: slots of each expert
    expert_start_ptr,  # [E] int32 out: first grouped row of each expert (written by program 0)
    expert_ids_ptr,  # [num_blocks] int32 out: expert of each M-block, -1 past the padded end
    num_padded_ptr,  # [1] int32 out: padded total (written by program 0)
    num_experts,  # E
    num_blocks,  # max_padded // BLOCK_M
    BLOCK_M: tl.constexpr,  # alignment (GEMM tile rows)
    BLOCK_E: tl.constexpr,  # next power of two >= E
    BLOCK_B: tl.constexpr,  # M-blocks labelled per program
):
    pid = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    emask = experts < num_experts
    counts = tl.load(counts_ptr + experts, mask=emask, other=0)  # [BLOCK_E]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [BLOCK_E] rounded up to BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # [BLOCK_E] inclusive: one past each expert's last row
    total = tl.sum(padded, axis=0)  # scalar
    if pid == 0:
        tl.store(expert_start_ptr + experts, ends - padded, mask=emask)
        tl.store(num_padded_ptr, total)
    blocks = pid * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B] int64
    row = blocks * BLOCK_M  # [BLOCK_B] first row of each block
    # the expert of a block = how many experts end at or before its first row
    done = (ends[None, :] <= row[:, None]) & emask[None, :]  # [BLOCK_B, BLOCK_E]
    expert = tl.sum(done.to(tl.int32), axis=1)  # [BLOCK_B]
    expert = tl.where(row < total, expert, -1)
    tl.store(expert_ids_ptr + blocks, expert, mask=blocks < num_blocks)


@triton.jit
def _scatter_kernel(
    topk_ids_ptr,  # [S] expert id of each slot; -1 = dropped
    rank_ptr,  # [S] int32: rank within chunk and expert (from _count_kernel)
    chunk_offsets_ptr,  # [E, num_chunks] int32: where each chunk starts inside each expert's group
    expert_start_ptr,  # [E] int32: first grouped row of each expert
    sorted_slot_ids_ptr,  # [max_padded] int32 out: slot of each grouped row (pre-filled with the sentinel)
    num_slots,  # S
    num_chunks,  # cdiv(S, BLOCK_S)
    BLOCK_S: tl.constexpr,  # slots per chunk, as in _count_kernel
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S] int64 slot ids
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)  # [BLOCK_S]
    keep = ids >= 0
    e = tl.where(keep, ids, 0)  # [BLOCK_S] safe index for dropped slots
    rank = tl.load(rank_ptr + offs, mask=keep, other=0)
    start = tl.load(expert_start_ptr + e, mask=keep, other=0)
    chunk_start = tl.load(chunk_offsets_ptr + e.to(tl.int64) * num_chunks + pid, mask=keep, other=0)
    tl.store(sorted_slot_ids_ptr + start + chunk_start + rank, offs.to(tl.int32), mask=keep)


@triton.jit
def _align_one_program_kernel(
    topk_ids_ptr,  # [S] expert id of each slot (int32 or int64); -1 = dropped
    sorted_slot_ids_ptr,  # [max_padded] int32 out: slot of each grouped row, S (the sentinel) for padding
    expert_ids_ptr,  # [num_blocks] int32 out: expert of each M-block, -1 past the padded end
    num_padded_ptr,  # [1] int32 out: padded total
    num_slots,  # S = T*K
    num_experts,  # E
    num_rows,  # max_padded (not always a multiple of BLOCK_M)
    num_blocks,  # max_padded // BLOCK_M
    BLOCK_M: tl.constexpr,  # alignment (GEMM tile rows)
    BLOCK_S: tl.constexpr,  # slots per step of both passes
    BLOCK_E: tl.constexpr,  # next power of two >= E
    BLOCK_B: tl.constexpr,  # M-blocks labelled per step
    BLOCK_R: tl.constexpr,  # rows cleared to the sentinel per step
):
    experts = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    emask = experts < num_experts
    # pass 1: slots per expert
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for s0 in range(0, num_slots, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)  # -1 matches nothing
    padded = ((counts + BLOCK_M - 1) // BLOCK_M).to(tl.int64) * BLOCK_M  # [BLOCK_E] rounded up to BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # [BLOCK_E] int64 inclusive: one past each expert's last row
    starts = ends - padded  # [BLOCK_E] first row of each expert (an offset of pass 2's stores)
    total = tl.sum(padded, axis=0)  # scalar
    tl.store(num_padded_ptr, total.to(tl.int32))
    # every M-block's expert, and every row cleared to the sentinel (pass 2 overwrites the real ones)
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)  # [BLOCK_B]
        row = blocks * BLOCK_M  # [BLOCK_B] first row of each block
        done = (ends[None, :] <= row[:, None]) & emask[None, :]  # [BLOCK_B, BLOCK_E]
        expert = tl.where(row < total, tl.sum(done.to(tl.int32), axis=1), -1)  # [BLOCK_B]
        tl.store(expert_ids_ptr + blocks, expert, mask=blocks < num_blocks)
    for r0 in range(0, num_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        tl.store(sorted_slot_ids_ptr + rows, tl.zeros_like(rows) + num_slots, mask=rows < num_rows)
    tl.debug_barrier()  # the sentinel writes above happen before pass 2's writes to the same rows
    # pass 2: each slot to  expert start + slots of its expert placed in earlier steps + rank in this step
    placed = tl.zeros([BLOCK_E], dtype=tl.int32)
    for s0 in range(0, num_slots, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
        hit = ids[:, None] == experts[None, :]  # [BLOCK_S, BLOCK_E]
        onehot = hit.to(tl.int32)
        rank = tl.sum(tl.where(hit, tl.cumsum(onehot, axis=0) - onehot, 0), axis=1)  # [BLOCK_S] earlier, same expert
        base = tl.sum(tl.where(hit, (starts + placed)[None, :], 0), axis=1)  # [BLOCK_S] its expert's next row
        tl.store(sorted_slot_ids_ptr + base + rank, offs, mask=ids >= 0)
        placed += tl.sum(onehot, axis=0)


# --------------------------------------------------------------------------------------- launchers

ONE_PROGRAM_MAX_SLOTS = 1024  # "auto" uses one program up to here (decode sizes); a guess until measured on a GPU
ALIGN_METHODS = ("auto", "one_program", "chunked")

def _chunk_size(block_e: int) -> int:
    """Slots per chunk: keep the one-hot tile near 8K elements, between 16 and 1024 slots."""
    return max(16, min(1024, 8192 // block_e))


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int, method: str = "auto") -> AlignedPlan:
    """Block-aligned plan for topk_ids [T, K] on its device (ids -1 are dropped); no host sync.

    method: "chunked" (four kernels, parallel over chunks of slots), "one_program" (one launch, for few
    slots), or "auto" (one_program up to ONE_PROGRAM_MAX_SLOTS slots). All give the same plan."""
    _check(topk_ids, num_experts, block_m)
    if method not in ALIGN_METHODS:
        raise ValueError(f"method must be one of {ALIGN_METHODS}, got {method!r}")
    T, K = topk_ids.shape
    S, E, dev = T * K, num_experts, topk_ids.device
    require_backend(topk_ids)
    max_padded = max_padded_rows(S, E, block_m)
    if max_padded >= 2**31:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} has T*K = {S} slots: with E = {E} and block_m = "
                         f"{block_m} the plan needs {max_padded} rows, past the int32 row ids (< 2^31)")
    num_blocks = max_padded // block_m
    if S > 0 and (method == "one_program" or (method == "auto" and S <= ONE_PROGRAM_MAX_SLOTS)):
        return _align_one_program(topk_ids, E, block_m, max_padded)
    sorted_ids = torch.full((max_padded,), S, dtype=torch.int32, device=dev)  # [max_padded] sentinel
    expert_ids = torch.full((num_blocks,), -1, dtype=torch.int32, device=dev)  # [num_blocks]
    num_padded = torch.zeros(1, dtype=torch.int32, device=dev)  # [1]
    plan = AlignedPlan(sorted_ids, expert_ids, num_padded, block_m, T, K)
    if S == 0:
        return plan
    flat = topk_ids.reshape(-1).contiguous()  # [S] (a no-op when already contiguous)
    block_e = next_pow2(E)
    block_s = _chunk_size(block_e)
    num_chunks = cdiv(S, block_s)
    rank = torch.empty(S, dtype=torch.int32, device=dev)  # [S]
    chunk_counts = torch.empty(E, num_chunks, dtype=torch.int32, device=dev)  # [E, chunks]
    chunk_offsets = torch.empty_like(chunk_counts)  # [E, chunks]
    counts = torch.empty(E, dtype=torch.int32, device=dev)  # [E]
    expert_start = torch.empty(E, dtype=torch.int32, device=dev)  # [E]
    _count_kernel[(num_chunks,)](flat, rank, chunk_counts, S, num_chunks, E,
                                 BLOCK_S=block_s, BLOCK_E=block_e, num_warps=8 if block_s * block_e > 2048 else 4)
    _scan_kernel[(E,)](chunk_counts, chunk_offsets, counts, num_chunks,
                       BLOCK_C=min(1024, next_pow2(num_chunks)))
    block_b = 64
    _offsets_kernel[(cdiv(num_blocks, block_b),)](counts, expert_start, expert_ids, num_padded, E,
                                                         num_blocks, BLOCK_M=block_m, BLOCK_E=block_e,
                                                         BLOCK_B=block_b)
    _scatter_kernel[(num_chunks,)](flat, rank, chunk_offsets, expert_start, sorted_ids, S, num_chunks,
                                   BLOCK_S=block_s)
    return plan


def _align_one_program(topk_ids: torch.Tensor, E: int, block_m: int, max_padded: int) -> AlignedPlan:
    T, K = topk_ids.shape
    S, dev = T * K, topk_ids.device
    flat = topk_ids.reshape(-1).contiguous()  # [S] (a no-op when already contiguous)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)  # [max_padded] (the kernel fills it)
    expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=dev)  # [num_blocks]
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)  # [1]
    block_e = next_pow2(E)
    _align_one_program_kernel[(1,)](flat, sorted_ids, expert_ids, num_padded, S, E, max_padded,
                                    max_padded // block_m, BLOCK_M=block_m, BLOCK_S=_chunk_size(block_e),
                                    BLOCK_E=block_e, BLOCK_B=max(1, min(64, 8192 // block_e)), BLOCK_R=1024,
                                    num_warps=4)
    return AlignedPlan(sorted_ids, expert_ids, num_padded, block_m, T, K)


def align_single_token(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPlan:
    """The T=1 path: every slot is its own M-block (its K experts are distinct), no sort needed."""
    _check(topk_ids, num_experts, block_m)
    T, K = topk_ids.shape
    if T != 1:
        raise ValueError(f"align_single_token needs T=1, got topk_ids {tuple(topk_ids.shape)}")
    dev = topk_ids.device
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    # inside a CUDA-graph capture the fill kernels only run at replay: never cache tensors made there
    rows = _single_token_rows.__wrapped__ if capturing else _single_token_rows
    sorted_ids, num_padded = rows(K, block_m, dev)
    expert_ids = topk_ids.reshape(K).to(torch.int32)  # [K]; -1 (dropped) blocks are skipped by the GEMMs
    return AlignedPlan(sorted_ids, expert_ids, num_padded, block_m, 1, K)


@functools.lru_cache(maxsize=64)
def _single_token_rows(K: int, block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The T=1 plan's rows, the same for every token: made once per (K, BLOCK_M, device), only ever read.

    sorted_ids [K*BLOCK_M]: slot k leads block k, the rest is the sentinel K; num_padded [1] = K*BLOCK_M."""
    sorted_ids = torch.full((K, block_m), K, dtype=torch.int32, device=device)  # [K, BLOCK_M] sentinel K
    sorted_ids[:, 0] = torch.arange(K, dtype=torch.int32, device=device)  # slot k leads block k
    return sorted_ids.reshape(-1), torch.full((1,), K * block_m, dtype=torch.int32, device=device)


# -------------------------------------------------------------------------------- torch reference

def align_block_size_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPlan:
    """Torch reference of align_block_size (same buffers, same sizes), built from group_by_expert."""
    _check(topk_ids, num_experts, block_m)
    T, K = topk_ids.shape
    S, E, dev = T * K, num_experts, topk_ids.device
    max_padded = max_padded_rows(S, E, block_m)
    sorted_ids = torch.full((max_padded,), S, dtype=torch.int32, device=dev)
    expert_ids = torch.full((max_padded // block_m,), -1, dtype=torch.int32, device=dev)
    plan = group_by_expert(topk_ids.long(), E)
    padded = (plan.counts + block_m - 1) // block_m * block_m  # [E]
    start = torch.cumsum(padded, 0) - padded  # [E] first row of each expert
    expert_of_row = plan.expert_of_row()  # [N]
    within = torch.arange(plan.num_rows, device=dev) - plan.offsets[expert_of_row]  # [N] rank in expert
    sorted_ids[start[expert_of_row] + within] = plan.sorted_slots.to(torch.int32)
    blocks = padded // block_m  # [E] M-blocks per expert
    n_used = int(blocks.sum())
    expert_ids[:n_used] = torch.repeat_interleave(torch.arange(E, device=dev), blocks).to(torch.int32)
    num_padded = padded.sum().reshape(1).to(torch.int32)
    return AlignedPlan(sorted_ids, expert_ids, num_padded, block_m, T, K)
