"""The naive expert-parallel scheme, for comparison: every token goes to every rank (all-gather, reduce back).

Legend: T tokens (this rank's own), T_total all ranks' tokens, D d_model, E experts, El = E / P local
experts, P ranks. Written against the same requests as moe_ref.ep_plan.rank_program (AllGather, AllToAll),
so the real run and the simulation execute it unchanged; registered as scheme "naive".
"""

from __future__ import annotations

import torch

from ..config import CapacityConfig
from ..ep_plan import AllGather, AllToAll, EPRankStats, Program, check_inputs, global_capacity, register_scheme
from ..layer import moe_forward
from ..permute import combine_dtype
from ..router import Routing

__all__ = ["naive_rank_program"]


def naive_rank_program(x: torch.Tensor, routing: Routing, w13_local: torch.Tensor, w2_local: torch.Tensor, *,
                       num_experts: int, world_size: int, rank: int, strategy: str = "grouped",
                       capacity: CapacityConfig | None = None, scoring: str = "softmax",
                       ranks_per_node: int | None = None) -> Program:
    """The naive expert-parallel forward, for comparison: send every token to every rank.

    All-gather x and the routing (every rank gets all T_total tokens), each rank computes its own experts'
    weighted contributions for every token (a partial output [T_total, D]), then each partial goes back to
    the rank owning the tokens (a reduce-scatter done as one all_to_all) and is summed there in rank order.
    Same answer as rank_program, but 2 * T_total * (P-1) rows cross the links whatever the routing.
    Returns (y [T, D], EPRankStats) with send_rows/recv_rows counting the rows this scheme moves.
    """
    El, D, _ = check_inputs(x, routing, w13_local, w2_local, num_experts, world_size, rank, strategy, capacity)
    P, E, T = world_size, num_experts, x.shape[0]
    xs = yield AllGather(x, "tokens")  # P x [T_p, D]
    x_all = torch.cat(xs)  # [T_total, D]
    cap, offset, meta_bytes = yield from global_capacity(routing, E, P, rank, capacity or CapacityConfig(
        overflow="dropless"), scoring)
    lo = rank * El
    part = None  # [T_total, D] this rank's experts' weighted contributions, all passes
    load = 0
    for r in cap.passes:
        mine = (r.topk_ids >= lo) & (r.topk_ids < lo + El)  # [T_total, K] assignments to local experts
        local = Routing(topk_ids=torch.where(mine, r.topk_ids - lo, -1),
                        topk_weights=r.topk_weights.masked_fill(~mine, 0.0))
        load += int(mine.sum())
        if x_all.shape[0]:
            yp = moe_forward(x_all, local, w13_local, w2_local, strategy=strategy).output
            part = yp.to(combine_dtype(x.dtype)) if part is None else part + yp
    if part is None:
        part = x_all.new_zeros(x_all.shape, dtype=combine_dtype(x.dtype))
    splits = [p.shape[0] for p in xs]  # tokens per rank
    back = yield AllToAll(part, splits, [T] * P)  # [P*T, D]: every rank's partial of my tokens
    y = back.view(P, T, D).sum(0)  # [T, D] summed in rank order: deterministic
    tok = torch.tensor(splits)
    send_rows = torch.full((P,), T, dtype=torch.long)
    recv_rows = tok.clone()
    allv = yield AllGather(torch.cat([send_rows, torch.tensor([load, T])]).to(x.device)[None])
    allv = torch.cat(allv).cpu()
    stats = EPRankStats(rank=rank, world_size=P, num_tokens=T, row_bytes=D * x.element_size(),
                        send_rows=send_rows, recv_rows=recv_rows, local_expert_load=torch.tensor([load]),
                        meta_bytes_sent=meta_bytes + (P + 2) * 8 * (P - 1), capacity=cap.capacity,
                        passes=len(cap.passes), dropped=cap.dropped, dropped_tokens=cap.dropped_tokens,
                        rerouted=cap.rerouted, traffic_rows=allv[:, :P], rank_load=allv[:, P],
                        rank_tokens=allv[:, P + 1])
    return y.to(x.dtype), stats


register_scheme("naive", naive_rank_program)
