"""Exercises of notebook 07 (Triton kernels): block-aligned grouping, its padded size, the deterministic combine.

Legend: T tokens, D d_model, E experts, K top-k, S = T*K slots (slot s = t*K + k), BLOCK_M rows per M-block.
Each check_* compares the reader's function with the torch references in moe_ref.kernels
(`align_block_size_torch`, `combine_torch`); they import no Triton kernel and need no GPU.
"""

from __future__ import annotations

import torch

from ._cases import ROUTING_SHAPES, routing, with_drops
from ._runner import Case, CheckResult, run_check

__all__ = ["check_padded_rows", "check_align_block_size", "check_combine"]

BLOCKS = (1, 2, 4, 8)  # BLOCK_M per case, in turn (a power of two, as the kernels require)


def check_padded_rows(fn, verbose: bool = True) -> CheckResult:
    """fn(counts [E] int64, block_m) -> int: rows of the aligned layout, Σ_e ceil(counts[e] / BLOCK_M) · BLOCK_M.

    An expert with no assignment takes no block; each other expert's count is rounded up to whole M-blocks.
    """
    grid = [("decode: T=1, E=8, K=2, BLOCK_M 16", [1, 0, 0, 1, 0, 0, 0, 0], 16),
            ("all zero", [0, 0, 0], 4),
            ("exact multiples", [8, 4, 12], 4),
            ("BLOCK_M 1: no padding", [3, 0, 5], 1),
            ("one hot expert", [61, 1, 1, 1], 16),
            ("E=1", [5], 8)]
    cases = [Case(name, dict(counts=torch.tensor(c), block_m=b),
                  int(sum((n + b - 1) // b * b for n in c))) for name, c, b in grid]
    return run_check("check_padded_rows", fn, cases, verbose=verbose,
                     hint="(counts + block_m - 1) // block_m * block_m, summed; return an int.")


def check_align_block_size(fn, verbose: bool = True) -> CheckResult:
    """fn(topk_ids [T, K] int64, num_experts, block_m) -> (sorted_slot_ids [P], expert_ids [P // BLOCK_M]).

    P = the padded rows actually used (check_padded_rows). Expert e's slots fill its rows in slot order
    (as moe_ref.group_by_expert), its count rounded up to whole M-blocks; padding rows hold the sentinel
    S = T*K; expert_ids[b] is the expert of M-block b. Dropped slots (id -1) take no row.
    Compared with moe_ref.kernels.align_block_size_torch cut to its used rows.
    """
    from moe_ref.kernels import align_block_size_torch

    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        ids, bm = routing(T, E, K, kind, seed=i).topk_ids, BLOCKS[i % len(BLOCKS)]
        plan = align_block_size_torch(ids, E, bm)
        P = int(plan.num_padded)
        cases.append(Case(f"{name}, BLOCK_M={bm}", {"topk_ids": ids, "num_experts": E, "block_m": bm},
                          (plan.sorted_slot_ids[:P].long(), plan.expert_ids[:P // bm].long()),
                          parts=("sorted_slot_ids", "expert_ids")))
    return run_check("check_align_block_size", fn, cases, verbose=verbose,
                     hint="group as in notebook 03, then start[e] = exclusive prefix sum of the padded counts; "
                          "row start[e] + rank holds the slot; fill everything else with T*K.")


def check_combine(fn, verbose: bool = True) -> CheckResult:
    """fn(slot_out [S, D] float32, topk_ids [T, K] int64) -> y [T, D] float32: y[t] = Σ_k slot_out[t*K + k].

    The rows are already weighted (the second GEMM's epilogue did it). A dropped slot (id -1) was never
    written, and its row may hold anything, NaN included: skip it, do not multiply it by 0.
    """
    from moe_ref.kernels import combine_torch

    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        ids = routing(T, E, K, kind, seed=i).topk_ids
        if kind != "drop" and i % 3 == 2:
            ids = with_drops(ids, seed=i)
        g = torch.Generator().manual_seed(200 + i)
        slot_out = torch.randn(T * K, 5, generator=g)
        slot_out[(ids.reshape(-1) < 0)] = float("nan")  # never written by the kernel
        y = combine_torch(slot_out, ids, torch.float32) if T else slot_out.new_zeros(0, 5)  # [T, D]
        cases.append(Case(name, {"slot_out": slot_out, "topk_ids": ids}, y, rtol=1e-5, atol=1e-6))
    return run_check("check_combine", fn, cases, verbose=verbose,
                     hint="view slot_out as [T, K, D] (D spelled out: -1 is ambiguous when T=0); "
                          "torch.where(valid[..., None], v, 0) before the sum.")
