"""Exercises of notebook 06b (expert parallelism past one node): inter-node bytes, node-limited top-k, replicas.

Legend: T tokens, E experts, K top-k, P ranks = N nodes × L ranks per node (rank r on node r // L),
En = E / N experts per node, M max nodes per token, R redundant expert slots, S = E + R physical slots.
Each check_* compares the reader's function with moe_ref's own: `inter_node_bytes`
(moe_ref/parallel/topology.py), `node_limited_topk` (moe_ref/router.py) and `replicate_experts`
(moe_ref/parallel/replicate.py).
"""

from __future__ import annotations

import torch

from ..parallel import Topology, inter_node_bytes
from ..parallel.replicate import replicate_experts
from ..router import node_limited_topk
from ..stats import expert_counts
from ._cases import routing
from ._runner import Case, CheckResult, run_check
from .parallel import traffic_rows

__all__ = ["check_inter_node_bytes", "check_node_limited_topk", "check_replicate_experts"]


def check_inter_node_bytes(fn, verbose: bool = True) -> CheckResult:
    """fn(traffic [P, P] int64, nodes, ranks_per_node) -> int: the bytes of traffic that cross between nodes.

    traffic[p, q] bytes go from rank p to rank q; rank r sits on node r // ranks_per_node. Bytes between two ranks
    of one node (and the diagonal, a local copy) stay inside it.
    """
    grid = [  # (name, T, E, K, nodes, ranks_per_node, kind, row_bytes)
        ("2 nodes x 2 ranks", 32, 16, 4, 2, 2, "random", 4096),
        ("T=0 (nothing moves)", 0, 8, 2, 2, 2, "random", 4096),
        ("one node: nothing crosses", 24, 8, 2, 1, 4, "random", 4096),
        ("one rank per node: every link crosses", 20, 8, 2, 4, 1, "random", 4096),
        ("a single rank", 7, 4, 2, 1, 1, "random", 256),
        ("one hot expert", 30, 16, 2, 2, 4, "hot", 14336),
        ("odd layout: 3 nodes x 2 ranks", 17, 12, 3, 3, 2, "random", 7),
        ("dropped assignments (id -1)", 25, 8, 2, 2, 2, "drop", 1024),
    ]
    cases = []
    for i, (name, T, E, K, N, L, kind, rb) in enumerate(grid):
        traffic = traffic_rows(routing(T, E, K, kind, seed=i).topk_ids, E, N * L) * rb  # [P, P] bytes
        cases.append(Case(name, dict(traffic=traffic, nodes=N, ranks_per_node=L),
                          inter_node_bytes(traffic, Topology(N, L))))
    return run_check("check_inter_node_bytes", fn, cases, verbose=verbose,
                     hint="node = torch.arange(P) // L; sum traffic where node[:, None] != node[None, :]; int(...).")


def check_node_limited_topk(fn, verbose: bool = True) -> CheckResult:
    """fn(scores [T, E] float32, top_k, num_nodes, max_nodes) -> (weights [T, K], ids [T, K] int64).

    Node n holds experts [n·En, (n+1)·En). Score each node by the sum of its top-j expert scores,
    j = min(2, En); keep each token's M best nodes; its K experts are the top-k of the scores on the kept nodes.
    weights are those experts' (unmasked) scores, both sorted by score as torch.topk returns them.
    M = N keeps every node: plain torch.topk(scores, K).
    """
    grid = [  # (name, T, E, K, N, M)
        ("T=6, E=16, K=4, 4 nodes, M=2", 6, 16, 4, 4, 2),
        ("T=0 (empty batch)", 0, 8, 2, 4, 2),
        ("M=N: the unrestricted router", 5, 12, 3, 3, 3),
        ("M=1: every expert on one node", 7, 16, 4, 2, 1),
        ("one expert per node (En=1: node score = top-1)", 6, 4, 2, 4, 2),
        ("K = M*En: all experts of the kept nodes", 5, 8, 4, 4, 2),
        ("a single node", 4, 6, 2, 1, 1),
        ("odd sizes T=9, E=15, K=3, 5 nodes, M=2", 9, 15, 3, 5, 2),
    ]
    cases = []
    for i, (name, T, E, K, N, M) in enumerate(grid):
        g = torch.Generator().manual_seed(300 + i)
        scores = torch.softmax(torch.randn(T, E, generator=g), dim=-1)  # [T, E], no ties
        w, ids = node_limited_topk(scores, K, num_nodes=N, max_nodes=M)
        cases.append(Case(name, dict(scores=scores, top_k=K, num_nodes=N, max_nodes=M), (w, ids),
                          parts=("weights", "ids"), rtol=1e-6, atol=1e-7))
    return run_check("check_node_limited_topk", fn, cases, verbose=verbose,
                     hint="scores.view(T, N, En).topk(j, -1).values.sum(-1) scores the nodes; mask the experts of the "
                          "others with -inf; topk; gather the unmasked scores.")


def check_replicate_experts(fn, verbose: bool = True) -> CheckResult:
    """fn(loads [E] int64, num_replicas, world_size) -> (copies [E] int64, slot_expert [S] int64).

    1. R times, one more copy to the expert with the largest load per copy, loads / copies (ties: lower id).
    2. Pack the S copies, heaviest (load per copy) first, ties lower expert id, each onto the least-loaded rank
       with a free slot (S / P slots per rank), preferring ranks that hold no copy of that expert yet; ties:
       lower rank. 3. slot_expert lists each rank's experts sorted by id, rank 0's slots first.
    """
    grid = [  # (name, T, E, K, R, P, kind): loads = expert counts of a routing
        ("E=8, R=4, P=4", 64, 8, 2, 4, 4, "random"),
        ("R=0: packing only", 40, 8, 2, 0, 4, "random"),
        ("one hot expert takes every copy", 48, 8, 2, 4, 4, "hot"),
        ("a single rank", 20, 6, 2, 2, 1, "random"),
        ("E=1", 9, 1, 1, 3, 2, "random"),
        ("all loads zero (T=0)", 0, 8, 2, 4, 4, "random"),
        ("odd sizes: E=9, R=3, P=3", 27, 9, 3, 3, 3, "random"),
    ]
    cases = []
    for i, (name, T, E, K, R, P, kind) in enumerate(grid):
        loads = expert_counts(routing(T, E, K, kind, seed=i).topk_ids, E)  # [E]
        plan = replicate_experts(loads, R, P)
        cases.append(Case(name, dict(loads=loads, num_replicas=R, world_size=P), (plan.copies, plan.slot_expert),
                          parts=("copies", "slot_expert")))
    ties = torch.tensor([4, 2, 2, 0])  # 4/2 = 2/1: the tie goes to the lower id
    plan = replicate_experts(ties, 2, 3)
    cases.append(Case("ties in load per copy", dict(loads=ties, num_replicas=2, world_size=3),
                      (plan.copies, plan.slot_expert), parts=("copies", "slot_expert")))
    return run_check("check_replicate_experts", fn, cases, verbose=verbose,
                     hint="copies[argmax(loads / copies)] += 1, R times (argmax returns the first maximum); then "
                          "sort (-load per copy, expert) and place each copy with min over ranks of (load, rank).")
