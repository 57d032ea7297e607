"""Exercises of notebook 04 (permutation): permute, the weighted unpermute, and the whole grouped forward.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, S = T*K slots, N kept assignments (grouped rows).
Each check_* compares the reader's function with moe_ref (`group_by_expert`, `permute`, `unpermute`;
the float64 `reference_moe` for the whole layer).
"""

from __future__ import annotations

from ..grouping import group_by_expert
from ..permute import permute, unpermute
from ..reference import reference_moe
from ._cases import ROUTING_SHAPES, dense_inputs, routing
from ._runner import Case, CheckResult, run_check

__all__ = ["check_permute", "check_unpermute", "check_grouped_moe"]


def check_permute(fn, verbose: bool = True) -> CheckResult:
    """fn(x [T, D], topk_ids [T, K] int64, num_experts) -> xs [N, D]: token rows in expert-grouped order.

    Row order as moe_ref.group_by_expert: expert 0's rows first, within an expert by slot s = t*K + k;
    row i is x[t] of its slot's token (a token appears once per chosen expert; dropped ids -1 are left out).
    """
    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        ids = routing(T, E, K, kind, seed=i).topk_ids
        x = dense_inputs(T, E, seed=i)[0]
        cases.append(Case(name, {"x": x, "topk_ids": ids, "num_experts": E}, permute(x, group_by_expert(ids, E))))
    return run_check("check_permute", fn, cases, verbose=verbose,
                     hint="sort the slots by expert (stable), then token = slot // K; x.index_select(0, token).")


def check_unpermute(fn, verbose: bool = True) -> CheckResult:
    """fn(ys [N, D], topk_ids [T, K] int64, topk_weights [T, K], num_experts) -> y [T, D].

    ys holds one row per kept assignment in expert-grouped order (as check_permute's xs);
    y[t] = Σ_k topk_weights[t, k] · ys[row of slot (t, k)], dropped slots (id -1) contribute zero.
    """
    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        r = routing(T, E, K, kind, seed=i)
        plan = group_by_expert(r.topk_ids, E)
        ys = dense_inputs(plan.num_rows, E, D=3, seed=100 + i)[0]  # [N, D] any expert outputs
        cases.append(Case(name, {"ys": ys, "topk_ids": r.topk_ids, "topk_weights": r.topk_weights,
                                 "num_experts": E}, unpermute(ys, plan, r.topk_weights), rtol=1e-6, atol=1e-7))
    return run_check("check_unpermute", fn, cases, verbose=verbose,
                     hint="the inverse permutation: inverse[sorted_slots[i]] = i; then gather ys[inverse] "
                          "as [T, K, D] and sum with the weights over K (a zero row for dropped slots).")


def check_grouped_moe(fn, verbose: bool = True) -> CheckResult:
    """fn(x [T, D], topk_ids [T, K], topk_weights [T, K], w13 [E, 2F, D], w2 [E, D, F]) -> y [T, D].

    The whole grouped forward: group, permute, one SwiGLU FFN per expert on its contiguous block
    (silu(gate) * up with gate = first F columns of x @ w13[e]ᵀ, then @ w2[e]ᵀ), unpermute with the weights.
    Inputs are float64; compared with moe_ref.reference_moe.
    """
    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        r = routing(T, E, K, kind, seed=i)
        x, w13, w2 = dense_inputs(T, E, seed=i)
        cases.append(Case(name, {"x": x, "topk_ids": r.topk_ids, "topk_weights": r.topk_weights, "w13": w13,
                                 "w2": w2}, reference_moe(x, r, w13, w2), rtol=1e-7, atol=1e-9))
    return run_check("check_grouped_moe", fn, cases, verbose=verbose,
                     hint="your permute, then for e in range(E): rows offsets[e]:offsets[e+1] through expert e, "
                          "then your unpermute. An expert with no rows has an empty block.")
