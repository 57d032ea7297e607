"""Generated inputs shared by the checkers: routings and weights, with the edge cases every checker covers.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, S = T*K slots.
Every generator is seeded: the same case gives the same tensors on every run.
"""

from __future__ import annotations

import torch

from ..router import Routing
from ..skew import random_routing

__all__ = ["ROUTING_SHAPES", "routing", "dense_inputs", "with_drops"]

# (case name, T, E, K, kind): kind "random", "hot" (every token's first choice is expert 0) or "drop"
ROUTING_SHAPES = [
    ("T=7, E=5, K=2", 7, 5, 2, "random"),
    ("T=0 (empty batch)", 0, 4, 2, "random"),
    ("T=1", 1, 6, 2, "random"),
    ("E=1, K=1", 5, 1, 1, "random"),
    ("K=E=3", 4, 3, 3, "random"),
    ("one hot expert", 9, 4, 2, "hot"),
    ("some experts empty", 3, 8, 1, "random"),
    ("odd sizes T=13, E=7, K=3", 13, 7, 3, "random"),
    ("dropped assignments (id -1)", 8, 4, 2, "drop"),
]


def routing(T: int, E: int, K: int, kind: str = "random", seed: int = 0) -> Routing:
    """topk_ids [T, K] int64 (K distinct experts per token), topk_weights [T, K] float32 summing to 1 per token.

    kind "hot": every token's first choice is expert 0 (a single hot expert);
    kind "drop": like "random", then about a quarter of the assignments dropped (id -1, as capacity leaves them).
    """
    r = random_routing(T, E, K, skew=0.0, seed=seed)
    ids, w = r.topk_ids.long().clone(), r.topk_weights.clone()
    if kind == "hot" and T:
        for t in range(T):
            row = ids[t].tolist()
            if 0 in row:
                row.remove(0)
            else:
                row.pop()
            ids[t] = torch.tensor([0] + row)
    if kind == "drop":
        ids = with_drops(ids, seed)
    return Routing(topk_ids=ids, topk_weights=w)


def with_drops(ids: torch.Tensor, seed: int = 0, share: float = 0.25) -> torch.Tensor:
    """ids [T, K] with about `share` of the entries set to -1 (seeded)."""
    g = torch.Generator().manual_seed(1000 + seed)
    drop = torch.rand(ids.shape, generator=g) < share
    return torch.where(drop, torch.full_like(ids, -1), ids)


def dense_inputs(T: int, E: int, D: int = 3, F: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x [T, D], w13 [E, 2F, D], w2 [E, D, F], all float64 (small odd D and F by default)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, 2 * F, D, generator=g, dtype=torch.float64) / D ** 0.5
    w2 = torch.randn(E, D, F, generator=g, dtype=torch.float64) / F ** 0.5
    return x, w13, w2
