"""Redundant experts (EPLB-style): copies of the hottest experts, and a packing that evens the rank loads.

Legend: T tokens, K top-k, E logical experts, R extra slots, S = E + R physical slots (expert copies),
P ranks, Sl = S / P slots per rank; rank r holds physical slots [r*Sl, (r+1)*Sl).

From observed expert loads [E] (assignments per expert):
  1. replicate: R times, give one more copy to the expert with the largest load per copy
     (load_e / copies_e; ties: lower expert id). A copy is expected to carry load_e / copies_e.
  2. pack: the S copies, heaviest first (ties: lower expert id), each onto the least-loaded rank that has
     a free slot, preferring ranks that hold no copy of that expert yet (greedy longest-processing-time
     first under a slot limit; ties: lower rank). Each rank's slots are then ordered by expert id.
Then a routing over the E logical experts becomes one over the S physical slots (`physical_routing`): the
assignments of an expert with c copies, in slot order (token t, choice k -> t*K + k), go round-robin to
its copies, so they split evenly. The expert weights are gathered per slot (`replicated_weights`), and
the expert-parallel plan runs unchanged on S "experts": the output equals the unreplicated one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grouping import group_by_expert
from ..router import Routing, validate_routing
from ..stats import expert_counts
from ..validate import check_int

__all__ = ["ReplicaPlan", "replicate_experts", "physical_routing", "replicated_weights", "rank_loads",
           "contiguous_plan", "load_ratio"]


@dataclass
class ReplicaPlan:
    """Where the expert copies live.

    slot_expert [S]: logical expert of each physical slot (rank-major: rank r holds slots r*Sl .. r*Sl+Sl-1).
    copies [E]: copies per logical expert (>= 1, sum S). planned_rank_load [P]: the packing's expected rank
    loads (from the loads it was planned on).
    """

    slot_expert: torch.Tensor
    copies: torch.Tensor
    world_size: int
    planned_rank_load: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.copies.shape[0]

    @property
    def num_slots(self) -> int:
        return self.slot_expert.shape[0]

    def slots_of(self, expert: int) -> list[int]:
        """The physical slots holding copies of `expert`, in slot order."""
        return (self.slot_expert == expert).nonzero().flatten().tolist()


def _check_loads(loads) -> torch.Tensor:
    ld = torch.as_tensor(loads)
    if ld.dim() != 1 or ld.numel() == 0 or ld.dtype.is_complex or bool((ld < 0).any()):
        raise ValueError(f"loads must be a non-empty [E] tensor of non-negative loads, got {tuple(ld.shape)}")
    return ld.double()


def contiguous_plan(num_experts: int, world_size: int) -> ReplicaPlan:
    """No replication: expert e on rank e // (E/P), the plain expert-parallel placement."""
    E, P = check_int("num_experts", num_experts, 1), check_int("world_size", world_size, 1)
    if E % P:
        raise ValueError(f"num_experts={E} is not divisible by world_size={P}")
    return ReplicaPlan(torch.arange(E), torch.ones(E, dtype=torch.long), P, torch.zeros(P, dtype=torch.float64))


def replicate_experts(loads, num_replicas: int, world_size: int) -> ReplicaPlan:
    """Copies of the hottest experts into R = num_replicas extra slots, packed onto P ranks (module doc).

    loads [E]: observed assignments per expert. (E + R) must be divisible by P.
    """
    ld = _check_loads(loads)
    E = ld.numel()
    R = check_int("num_replicas", num_replicas, 0)
    P = check_int("world_size", world_size, 1)
    S = E + R
    if S % P:
        raise ValueError(f"E + num_replicas = {E} + {R} = {S} slots is not divisible by world_size={P}")
    Sl = S // P
    copies = torch.ones(E, dtype=torch.long)
    for _ in range(R):  # largest load per copy gets one more copy (argmax: first maximum = lower id)
        copies[int(torch.argmax(ld / copies))] += 1
    per_copy = ld / copies  # [E]
    items = sorted(((float(per_copy[e]), e) for e in range(E) for _ in range(int(copies[e]))),
                   key=lambda it: (-it[0], it[1]))
    rank_load = [0.0] * P
    held: list[list[int]] = [[] for _ in range(P)]
    for w, e in items:
        free = [r for r in range(P) if len(held[r]) < Sl]
        fresh = [r for r in free if e not in held[r]] or free
        r = min(fresh, key=lambda q: (rank_load[q], q))
        held[r].append(e)
        rank_load[r] += w
    slot_expert = torch.tensor([e for r in range(P) for e in sorted(held[r])], dtype=torch.long)
    return ReplicaPlan(slot_expert, copies, P, torch.tensor(rank_load, dtype=torch.float64))


def physical_routing(routing: Routing, plan: ReplicaPlan) -> Routing:
    """The routing over the S physical slots: each expert's assignments round-robin over its copies.

    routing [T, K] over E logical experts (-1 = dropped stays -1). Weights and logits are unchanged
    (logits stay [T, E], logical).
    """
    if not isinstance(plan, ReplicaPlan):
        raise TypeError(f"plan must be a ReplicaPlan, got {type(plan).__name__}")
    E = plan.num_experts
    validate_routing(routing, routing.num_tokens, E, allow_dropped=True)
    ids = routing.topk_ids  # [T, K]
    dp = group_by_expert(ids, E)
    pos = dp.rank.view(ids.shape)  # [T, K] position among the expert's assignments (slot order), -1 dropped
    order = torch.argsort(plan.slot_expert * plan.num_slots + torch.arange(plan.num_slots), stable=True)
    first = torch.zeros(E + 1, dtype=torch.long)
    first[1:] = torch.cumsum(plan.copies, 0)  # copies of expert e: order[first[e]:first[e+1]]
    safe = ids.clamp(min=0)
    j = torch.where(ids >= 0, pos % plan.copies[safe], 0)  # [T, K] which copy
    phys = order[first[safe] + j]  # [T, K] physical slot
    return Routing(topk_ids=torch.where(ids >= 0, phys, -1), topk_weights=routing.topk_weights,
                   logits=None)


def replicated_weights(w13: torch.Tensor, w2: torch.Tensor, plan: ReplicaPlan):
    """w13 [E, 2F, D], w2 [E, D, F] -> [S, 2F, D], [S, D, F]: each slot holds its expert's weights (copies)."""
    if w13.shape[0] != plan.num_experts or w2.shape[0] != plan.num_experts:
        raise ValueError(f"w13/w2 must hold E={plan.num_experts} experts, got {w13.shape[0]} and {w2.shape[0]}")
    idx = plan.slot_expert.to(w13.device)
    return w13.index_select(0, idx), w2.index_select(0, idx)


def rank_loads(routing: Routing, plan: ReplicaPlan) -> torch.Tensor:
    """[P] assignments each rank computes when `routing` (logical) runs on `plan`'s placement."""
    phys = physical_routing(routing, plan)
    return expert_counts(phys.topk_ids, plan.num_slots).view(plan.world_size, -1).sum(1)


def load_ratio(load) -> float:
    """max / mean of a per-rank load [P] (1.0 = even, and when nothing was computed)."""
    ld = torch.as_tensor(load).double()
    return 1.0 if float(ld.sum()) == 0 else float(ld.max() / ld.mean())
