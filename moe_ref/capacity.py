"""Expert capacity and overflow: how many assignments an expert may take, and what happens to the rest.

Legend: T tokens, K top-k, E experts, C capacity per expert, S = T*K slots (slot s = t*K + k).
C = max(min_capacity, ceil(T * K * capacity_factor / E)).
Priority within an expert (drop_policy):
  "position":    choice rank first, then token index: every first choice before any second choice.
  "probability": highest gate weight first; ties go to the earlier token.
The slots an expert keeps are its first C in priority order; the rest overflow, and
CapacityConfig.overflow decides their fate (drop / reroute / spill / dropless / error).
Reroute weight rule: a moved assignment keeps its original gate weight, so a token's K weights
still sum to what they did (1 when renormalised) and the combine stays the same convex mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import CapacityConfig, check_capacity
from .router import Routing
from .validate import check_int


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int = 1) -> int:
    """C = max(min_capacity, ceil(T * K * capacity_factor / E))."""
    CapacityConfig(capacity_factor=capacity_factor, min_capacity=min_capacity)  # validates both
    check_int("num_tokens", num_tokens, 0)
    check_int("num_experts", num_experts, 1)
    check_int("top_k", top_k, 1)
    # round first so 0.1*3-style float noise cannot push ceil() up by one
    return max(min_capacity, math.ceil(round(num_tokens * top_k * capacity_factor / num_experts, 9)))


def priority_order(topk_weights: torch.Tensor, policy: str = "position") -> torch.Tensor:
    """[S] slot ids in keep-first order for topk_weights [T, K] (slot s = t*K + k)."""
    T, K = topk_weights.shape
    if policy == "position":
        return torch.arange(T * K, device=topk_weights.device).view(T, K).t().reshape(-1)  # (k, t) order
    if policy == "probability":
        return torch.sort(-topk_weights.reshape(-1).float(), stable=True).indices  # ties: earlier token
    raise ValueError(f"drop_policy must be 'position' or 'probability', got {policy!r}")


def priority_rank(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                  policy: str = "position") -> torch.Tensor:
    """[T, K] rank of each assignment among its expert's assignments in priority order (-1 if id < 0)."""
    T, K = topk_ids.shape
    S = T * K
    flat = topk_ids.reshape(-1)  # [S]
    dev = flat.device
    order = priority_order(topk_weights, policy)  # [S]
    key = torch.where(flat >= 0, flat, num_experts)[order]  # [S] expert of each slot, in priority order
    grouped = order[torch.sort(key, stable=True).indices]  # [S] slots grouped by expert, priority kept
    counts = torch.bincount(key, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts  # [E+1]
    gkey = torch.where(flat >= 0, flat, num_experts)[grouped]
    rank = torch.empty(S, dtype=torch.long, device=dev)
    rank[grouped] = torch.arange(S, device=dev) - starts[gkey]
    return torch.where(flat >= 0, rank, -1).view(T, K)


@dataclass
class CapacityResult:
    """Routings to run (one per pass) and what capacity did.

    passes:         Routings to compute and sum (1, or ceil(max load / C) with "spill"); ids -1 are dropped
                    assignments, their weights zeroed.
    capacity:       C, or None when no capacity applies (capacity=None or overflow="dropless").
    dropped:        assignments that contribute nothing; dropped_tokens: tokens that lost all K.
    rerouted:       assignments moved to another expert ("reroute"; they keep their gate weight).
    final_ids:      [T, K] experts after drop/reroute (-1 = dropped); the original ids otherwise.
    """

    passes: list[Routing]
    capacity: int | None
    dropped: int = 0
    dropped_tokens: int = 0
    rerouted: int = 0
    final_ids: torch.Tensor | None = field(default=None, repr=False)  # [T, K] after drop/reroute


def _masked(r: Routing, ids: torch.Tensor) -> Routing:
    return Routing(topk_ids=ids, topk_weights=r.topk_weights.masked_fill(ids < 0, 0.0), logits=r.logits)


def _count_dropped_tokens(before: torch.Tensor, after: torch.Tensor) -> int:
    had = (before >= 0).any(-1)
    lost = (after < 0).all(-1)
    return int((had & lost).sum())


def apply_capacity(routing: Routing, num_experts: int, capacity: CapacityConfig | None,
                   scoring: str = "softmax") -> CapacityResult:
    """Apply a CapacityConfig to a Routing of T tokens over num_experts experts (see module doc).

    capacity=None or overflow="dropless" changes nothing; "error" raises a ValueError naming the
    first expert over C, its load and C. "reroute" needs routing.logits (probabilities by `scoring`).
    """
    check_capacity(capacity)
    if capacity is None or capacity.overflow == "dropless":
        return CapacityResult(passes=[routing], capacity=None, final_ids=routing.topk_ids)
    ids = routing.topk_ids  # [T, K]
    T, K = ids.shape
    C = expert_capacity(T, num_experts, K, capacity.capacity_factor, capacity.min_capacity)
    valid = ids >= 0
    load = torch.bincount(ids[valid], minlength=num_experts)  # [E]
    if capacity.overflow == "error":
        over = (load > C).nonzero()
        if over.numel():
            e = int(over[0])
            raise ValueError(f"expert {e} has load {int(load[e])} > capacity {C} "
                             f"(T={T}, K={K}, E={num_experts}, capacity_factor={capacity.capacity_factor}); "
                             f"{over.numel()} expert(s) over capacity")
        return CapacityResult(passes=[routing], capacity=C, final_ids=ids)
    rank = priority_rank(ids, routing.topk_weights, num_experts, capacity.drop_policy)  # [T, K]
    if capacity.overflow == "spill":
        if C < 1 and bool(valid.any()):
            raise ValueError("overflow='spill' needs capacity >= 1 (raise min_capacity or capacity_factor)")
        n_pass = max(1, math.ceil(int(load.max()) / C)) if bool(valid.any()) else 1
        passes = [_masked(routing, torch.where(valid & (rank // max(C, 1) == p), ids, -1)) for p in range(n_pass)]
        return CapacityResult(passes=passes, capacity=C, final_ids=ids)
    keep = valid & (rank < C)
    new_ids = torch.where(keep, ids, -1)
    rerouted = 0
    if capacity.overflow == "reroute":
        new_ids, rerouted = _reroute(routing, new_ids, keep, valid, rank, C, num_experts, capacity, scoring)
    dropped = int((valid & (new_ids < 0)).sum())
    return CapacityResult(passes=[_masked(routing, new_ids)], capacity=C, dropped=dropped,
                          dropped_tokens=_count_dropped_tokens(ids, new_ids), rerouted=rerouted,
                          final_ids=new_ids)


def _reroute(routing, new_ids, keep, valid, rank, C, E, capacity, scoring):
    """Move each overflowing assignment, in priority order, to the token's best other expert with room."""
    if routing.logits is None:
        raise ValueError("overflow='reroute' needs router probabilities, but this Routing has no logits "
                         "(built by hand); pass logits=[T, E] or use another overflow strategy")
    T, K = new_ids.shape
    over = (valid & ~keep).reshape(-1)  # [S]
    if not bool(over.any()):
        return new_ids, 0
    # overflowing slots, visited in the drop policy's priority order
    order = priority_order(routing.topk_weights, capacity.drop_policy)
    order = order[over[order]].tolist()
    prefs = torch.sort(routing.probs(scoring).cpu(), dim=-1, descending=True, stable=True).indices.tolist()
    ids_l = new_ids.cpu().reshape(-1).tolist()
    room = (C - torch.bincount(new_ids[new_ids >= 0], minlength=E)).tolist()
    moved = 0
    for s in order:
        t = s // K
        taken = set(ids_l[t * K:(t + 1) * K])  # the slot's own (full) expert has no room anyway
        for e in prefs[t]:
            if e not in taken and room[e] > 0:
                ids_l[s] = e
                room[e] -= 1
                moved += 1
                break
    return torch.tensor(ids_l, dtype=torch.long, device=new_ids.device).view(T, K), moved
