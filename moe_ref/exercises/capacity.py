"""Exercises of notebook 05 (capacity and overflow): the capacity formula and the two drop policies.

Legend: T tokens, E experts, K top-k, C capacity per expert, S = T*K slots (slot s = t*K + k).
Each check_* compares the reader's function with moe_ref (`expert_capacity`, `priority_rank`;
moe_ref/capacity.py).
"""

from __future__ import annotations

import torch

from ..capacity import expert_capacity, priority_rank
from ._cases import ROUTING_SHAPES, routing
from ._runner import Case, CheckResult, run_check

__all__ = ["check_expert_capacity", "check_drop_by_position", "check_drop_by_probability"]


def check_expert_capacity(fn, verbose: bool = True) -> CheckResult:
    """fn(num_tokens, num_experts, top_k, capacity_factor, min_capacity) -> C: int.

    C = max(min_capacity, ceil(T · K · capacity_factor / E)): the K assignments of every token count.
    """
    grid = [  # (name, T, E, K, capacity_factor, min_capacity)
        ("T=256, E=8, K=2, cf 1.25", 256, 8, 2, 1.25, 1),
        ("divides exactly", 64, 8, 2, 1.0, 1),
        ("rounds up", 10, 8, 2, 1.0, 1),
        ("T=0: min_capacity", 0, 8, 2, 1.0, 4),
        ("T=1 decode step, E=64, K=8", 1, 64, 8, 1.0, 1),
        ("E=1", 7, 1, 1, 1.5, 1),
        ("float noise: 10*3*0.1/3 is 1, not 2", 10, 3, 3, 0.1, 1),
        ("capacity factor below 1", 100, 4, 1, 0.5, 1),
    ]
    cases = [Case(name, dict(num_tokens=t, num_experts=e, top_k=k, capacity_factor=cf, min_capacity=m),
                  expert_capacity(t, e, k, cf, m)) for name, t, e, k, cf, m in grid]
    return run_check("check_expert_capacity", fn, cases, verbose=verbose,
                     hint="all T·K assignments count; round the quotient to 9 decimals before math.ceil "
                          "(float noise: 1.0000000000000002 must not become 2).")


def _kept(ids: torch.Tensor, weights: torch.Tensor, E: int, C: int, policy: str) -> torch.Tensor:
    rank = priority_rank(ids, weights, E, policy)  # [T, K]
    return torch.where((ids >= 0) & (rank < C), ids, torch.full_like(ids, -1))


def _drop_cases(policy: str, with_weights: bool) -> list[Case]:
    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        r = routing(T, E, K, kind, seed=i)
        C = max(1, (T * K) // (2 * E) + (i % 2))  # tight enough that most cases drop something
        args = {"topk_ids": r.topk_ids}
        if with_weights:
            args["topk_weights"] = r.topk_weights
        args.update(num_experts=E, capacity=C)
        cases.append(Case(f"{name}, C={C}", args, _kept(r.topk_ids, r.topk_weights, E, C, policy)))
    r = routing(6, 3, 2, "hot", seed=42)  # C = 0: everything goes
    args = {"topk_ids": r.topk_ids, **({"topk_weights": r.topk_weights} if with_weights else {}),
            "num_experts": 3, "capacity": 0}
    cases.append(Case("C=0", args, _kept(r.topk_ids, r.topk_weights, 3, 0, policy)))
    return cases


def check_drop_by_position(fn, verbose: bool = True) -> CheckResult:
    """fn(topk_ids [T, K] int64, num_experts, capacity) -> kept_ids [T, K]: ids over capacity set to -1.

    Each expert keeps at most C assignments. Position policy (GShard): every first choice (k = 0) before any
    second choice, and within one k, earlier tokens first. Ids already -1 stay -1.
    """
    return run_check("check_drop_by_position", fn, _drop_cases("position", False), verbose=verbose,
                     hint="walk the slots in (k, t) order, count per expert, keep while the count is below C.")


def check_drop_by_probability(fn, verbose: bool = True) -> CheckResult:
    """fn(topk_ids [T, K], topk_weights [T, K], num_experts, capacity) -> kept_ids [T, K] (dropped: -1).

    Probability policy: each expert keeps its C assignments of highest gate weight; ties go to the
    earlier slot s = t*K + k. Ids already -1 stay -1.
    """
    return run_check("check_drop_by_probability", fn, _drop_cases("probability", True), verbose=verbose,
                     hint="torch.sort(-weights.reshape(-1), stable=True) gives the keep-first order of the slots.")
