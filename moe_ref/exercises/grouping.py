"""Exercises of notebook 03 (token grouping): the prefix-sum offsets and the counting sort of the slots.

Legend: T tokens, E experts, K top-k, S = T*K slots (slot s = t*K + k), N kept assignments.
Each check_* compares the reader's function with moe_ref.group_by_expert (moe_ref/grouping.py).
"""

from __future__ import annotations

import torch

from ..grouping import group_by_expert
from ._cases import ROUTING_SHAPES, routing
from ._runner import Case, CheckResult, run_check

__all__ = ["check_offsets", "check_group_by_expert", "check_rank_in_expert"]


def check_offsets(fn, verbose: bool = True) -> CheckResult:
    """fn(counts [E] int64) -> offsets [E+1] int64: the exclusive prefix sum, offsets[0] = 0, offsets[E] = N.

    Expert e owns the grouped rows offsets[e]:offsets[e+1].
    """
    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        plan = group_by_expert(routing(T, E, K, kind, seed=i).topk_ids, E)
        cases.append(Case(name, {"counts": plan.counts.clone()}, plan.offsets))
    return run_check("check_offsets", fn, cases, verbose=verbose,
                     hint="torch.cumsum gives the inclusive sum; put a 0 in front.")


def check_group_by_expert(fn, verbose: bool = True) -> CheckResult:
    """fn(topk_ids [T, K] int64, num_experts) -> sorted_slots [N] int64: slot ids s = t*K + k grouped by expert.

    Expert 0's slots first, then expert 1's, ...; within an expert, in slot order (a stable sort). Slots
    with id -1 (dropped) are left out. Try the counting sort: histogram -> offsets -> rank -> scatter.
    """
    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        ids = routing(T, E, K, kind, seed=i).topk_ids
        cases.append(Case(name, {"topk_ids": ids, "num_experts": E}, group_by_expert(ids, E).sorted_slots))
    return run_check("check_group_by_expert", fn, cases, verbose=verbose,
                     hint="torch.sort(key, stable=True) with key = expert id (dropped slots: key E, cut off).")


def check_rank_in_expert(fn, verbose: bool = True) -> CheckResult:
    """fn(topk_ids [T, K] int64, num_experts) -> rank [S] int64: each slot's place within its expert's block.

    rank[s] = how many earlier slots (s' < s) chose the same expert; -1 for a dropped slot (id -1).
    Then offsets[e] + rank[s] is slot s's grouped row: the scatter step of the counting sort.
    """
    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        ids = routing(T, E, K, kind, seed=i).topk_ids
        cases.append(Case(name, {"topk_ids": ids, "num_experts": E},
                          group_by_expert(ids, E, method="counting").rank.to(torch.long)))
    return run_check("check_rank_in_expert", fn, cases, verbose=verbose,
                     hint="one-hot [S, E] of the ids, cumsum over slots, minus the one-hot itself, "
                          "then pick each slot's own column.")
