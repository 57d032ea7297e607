"""Cutting one batch into per-rank pieces: token counts, routings, and rows per destination rank.

Legend: T tokens (T_total: the whole batch), K top-k, E experts, P ranks, El = E / P.
"""

from __future__ import annotations

import torch

from ..ep_plan import check_world
from ..router import Routing


def split_tokens(num_tokens: int, world_size: int, token_splits=None) -> list[int]:
    """Tokens per rank: `token_splits` if given (checked), else near-even contiguous chunks."""
    if token_splits is None:
        base, extra = divmod(num_tokens, world_size)
        return [base + (1 if p < extra else 0) for p in range(world_size)]
    splits = [int(s) for s in token_splits]
    if len(splits) != world_size or any(s < 0 for s in splits) or sum(splits) != num_tokens:
        raise ValueError(f"token_splits must be {world_size} non-negative ints summing to T={num_tokens}, "
                         f"got {list(token_splits)}")
    return splits


def split_routing(routing: Routing, splits: list[int]) -> list[Routing]:
    """Cut a [T_total, K] Routing into per-rank Routings along the tokens."""
    lg = routing.logits.split(splits) if routing.logits is not None else [None] * len(splits)
    return [Routing(topk_ids=i, topk_weights=w, logits=g) for i, w, g in
            zip(routing.topk_ids.split(splits), routing.topk_weights.split(splits), lg)]


def unique_destinations(routing: Routing, num_experts: int, world_size: int, token_splits=None) -> torch.Tensor:
    """[P, P] rows from rank p to rank q if each token were sent once per destination *rank* (not per expert).

    rank_program sends one row per assignment, so a token whose K experts share a rank travels twice;
    deduplicating per rank (as DeepEP does) sends it once. Computed from the routing (no transport).
    """
    El = check_world(num_experts, world_size)
    splits = split_tokens(routing.num_tokens, world_size, token_splits)
    src = torch.repeat_interleave(torch.arange(world_size), torch.tensor(splits))  # [T] source rank
    ids = routing.topk_ids  # [T, K]
    dest = torch.where(ids >= 0, ids // El, world_size)  # [T, K] destination rank (P = dropped)
    hit = torch.zeros(routing.num_tokens, world_size + 1, dtype=torch.long).scatter_(1, dest, 1)[:, :world_size]
    out = torch.zeros(world_size, world_size, dtype=torch.long)
    return out.index_add_(0, src, hit)  # [P, P]
