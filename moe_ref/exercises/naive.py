"""Exercises of notebook 01 (naive batching): count each expert's rows, and the dense MoE forward.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
Each check_* runs the reader's function on generated cases (T=0, E=1, K=E, one hot expert, dropped ids,
odd sizes) and compares with moe_ref (`expert_counts`; the float64 `reference_moe`).
"""

from __future__ import annotations

from ..reference import reference_moe
from ..router import Routing
from ..stats import expert_counts
from ._cases import ROUTING_SHAPES, dense_inputs, routing
from ._runner import Case, CheckResult, run_check

__all__ = ["check_expert_counts", "check_dense_moe"]


def check_expert_counts(fn, verbose: bool = True) -> CheckResult:
    """fn(topk_ids [T, K] int64, num_experts) -> counts [E] int64: how many assignments chose each expert.

    Ids of -1 (dropped assignments) count for no expert; an expert nobody chose counts 0.
    """
    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        ids = routing(T, E, K, kind, seed=i).topk_ids
        cases.append(Case(name, {"topk_ids": ids, "num_experts": E}, expert_counts(ids, E)))
    return run_check("check_expert_counts", fn, cases, verbose=verbose,
                     hint="torch.bincount(ids, minlength=E) counts; drop the -1 entries first.")


def check_dense_moe(fn, verbose: bool = True) -> CheckResult:
    """fn(x [T, D], topk_ids [T, K], topk_weights [T, K], w13 [E, 2F, D], w2 [E, D, F]) -> y [T, D].

    The "dense" strategy: run every expert e on every token (h = x @ w13[e]ᵀ, silu(gate) * up, @ w2[e]ᵀ),
    then keep, for each token, only its K chosen experts, weighted: y[t] = Σ_k w[t, k] · expert_{ids[t, k]}(x[t]).
    Dropped assignments (id -1) contribute zero. Inputs are float64; compared with moe_ref.reference_moe.
    """
    cases = []
    for i, (name, T, E, K, kind) in enumerate(ROUTING_SHAPES):
        r = routing(T, E, K, kind, seed=i)
        x, w13, w2 = dense_inputs(T, E, seed=i)
        y = reference_moe(x, Routing(r.topk_ids, r.topk_weights), w13, w2)
        cases.append(Case(name, {"x": x, "topk_ids": r.topk_ids, "topk_weights": r.topk_weights, "w13": w13,
                                 "w2": w2}, y, rtol=1e-7, atol=1e-9))
    return run_check("check_dense_moe", fn, cases, verbose=verbose,
                     hint="F = w2.shape[2]; gate = h[..., :F], up = h[..., F:]; mask = (topk_ids == e) "
                          "picks the weight of expert e per token.")
