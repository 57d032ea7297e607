"""Exercises of notebook 06 (expert parallelism): the all-to-all's traffic matrix, deduplicated per rank, bytes.

Legend: T tokens (the whole batch), E experts, K top-k, P ranks, El = E / P; rank p owns experts
[p·El, (p+1)·El) and the p-th contiguous chunk of tokens (token_splits[p] of them).
Each check_* compares the reader's function with moe_ref's own: the rows rank_program sends
(`dispatch_splits` of `group_by_expert`, moe_ref/ep_plan.py), `unique_destinations`
(moe_ref/parallel/split.py) and `EPRankStats.bytes_sent` (moe_ref/ep_plan.py).
"""

from __future__ import annotations

import torch

from ..ep_plan import EPRankStats, dispatch_splits
from ..grouping import group_by_expert
from ..parallel import split_tokens, unique_destinations
from ..router import Routing
from ._cases import routing
from ._runner import Case, CheckResult, run_check

__all__ = ["check_traffic_matrix", "check_unique_destinations", "check_bytes_sent"]

# (case name, T, E, K, P, token_splits or None (near-even), kind as in _cases.routing)
EP_SHAPES = [
    ("T=16, E=8, K=2, P=4", 16, 8, 2, 4, None, "random"),
    ("T=0 (empty batch)", 0, 4, 2, 2, None, "random"),
    ("P=1: everything stays local", 6, 4, 2, 1, None, "random"),
    ("E=P: one expert per rank", 9, 4, 2, 4, None, "random"),
    ("K=E=4, P=2", 5, 4, 4, 2, None, "random"),
    ("one hot expert", 12, 8, 2, 4, None, "hot"),
    ("a rank with no tokens of its own", 10, 6, 2, 3, [0, 7, 3], "random"),
    ("odd sizes T=13, E=9, K=3, P=3", 13, 9, 3, 3, None, "random"),
    ("dropped assignments (id -1)", 11, 8, 2, 4, None, "drop"),
]


def _splits(T: int, P: int, token_splits) -> list[int]:
    return split_tokens(T, P, token_splits)


def traffic_rows(topk_ids: torch.Tensor, num_experts: int, world_size: int, token_splits=None) -> torch.Tensor:
    """[P, P] rows rank p sends to rank q: each rank's dispatch splits, as rank_program computes them."""
    P = world_size
    out = torch.zeros(P, P, dtype=torch.long)
    for p, ids in enumerate(topk_ids.split(_splits(topk_ids.shape[0], P, token_splits))):
        out[p] = dispatch_splits(group_by_expert(ids, num_experts), P).sum(1)
    return out


def _ep_cases(expected) -> list[Case]:
    cases = []
    for i, (name, T, E, K, P, splits, kind) in enumerate(EP_SHAPES):
        ids = routing(T, E, K, kind, seed=i).topk_ids
        sp = _splits(T, P, splits)
        cases.append(Case(name, dict(topk_ids=ids, num_experts=E, world_size=P, token_splits=list(sp)),
                          expected(ids, E, P, sp)))
    return cases


def check_traffic_matrix(fn, verbose: bool = True) -> CheckResult:
    """fn(topk_ids [T, K] int64, num_experts, world_size, token_splits: list[int]) -> traffic [P, P] int64.

    traffic[p, q]: the token rows rank p sends to rank q in the dispatch all-to-all, one per assignment of p's
    own tokens (rows token_splits[0] + ... + token_splits[p-1] onward) to an expert q owns. The diagonal is what
    stays local; dropped assignments (id -1) send nothing. Row p is rank p's send splits.
    """
    return run_check("check_traffic_matrix", fn,
                     _ep_cases(lambda ids, E, P, sp: traffic_rows(ids, E, P, sp)), verbose=verbose,
                     hint="cut topk_ids with .split(token_splits); a rank's row is the bincount of ids // (E // P) "
                          "over its valid ids, minlength P.")


def check_unique_destinations(fn, verbose: bool = True) -> CheckResult:
    """fn(topk_ids [T, K] int64, num_experts, world_size, token_splits: list[int]) -> rows [P, P] int64.

    As check_traffic_matrix, but each token is sent once per destination *rank*, not once per expert: a token
    whose K experts share a rank travels once (DeepEP-style deduplication). Dropped assignments send nothing.
    """
    def expected(ids, E, P, sp):
        r = Routing(topk_ids=ids, topk_weights=torch.ones(ids.shape))
        return unique_destinations(r, E, P, sp)

    return run_check("check_unique_destinations", fn, _ep_cases(expected), verbose=verbose,
                     hint="per token, a [P] bool 'some expert on rank q' (scatter into P + 1 columns, the last for "
                          "dropped ids), then sum those rows per source rank.")


def _bytes_sent(traffic: torch.Tensor, row_bytes: int) -> torch.Tensor:
    P = traffic.shape[0]
    return torch.tensor([EPRankStats(rank=p, world_size=P, num_tokens=0, row_bytes=row_bytes, send_rows=traffic[p],
                                     recv_rows=traffic[:, p], local_expert_load=torch.zeros(0)).bytes_sent
                         for p in range(P)], dtype=torch.long)


def check_bytes_sent(fn, verbose: bool = True) -> CheckResult:
    """fn(traffic [P, P] int64, row_bytes) -> sent [P] int64: bytes each rank puts on links in one forward.

    traffic[p, q] rows go from p to q in the dispatch; the combine sends each result row back, along the
    transpose. Rank p sends its dispatch rows to other ranks and the results of the rows other ranks sent it;
    the diagonal is a local copy and crosses no link. Each row is row_bytes bytes.
    """
    cases = []
    for i, (name, T, E, K, P, splits, kind) in enumerate(EP_SHAPES):
        traffic = traffic_rows(routing(T, E, K, kind, seed=i).topk_ids, E, P, _splits(T, P, splits))
        row_bytes = (64, 2 * 4096, 4 * 256, 7)[i % 4]  # bf16 rows of D = 4096, float32 of D = 256, odd
        cases.append(Case(name, dict(traffic=traffic, row_bytes=row_bytes), _bytes_sent(traffic, row_bytes)))
    return run_check("check_bytes_sent", fn, cases, verbose=verbose,
                     hint="off-diagonal of row p (dispatch out) + off-diagonal of column p (combine out), "
                          "times row_bytes.")
