"""Static-capacity dispatch (GShard style): a fixed [E, C, D] buffer per pass, one batched GEMM.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, C capacity, N kept assignments.
Each kept assignment lands at buf[expert, rank-within-expert]; empty places are padding that is
still computed. Without a capacity the buffer is sized by the busiest expert (C = max load), which
shows what static shapes cost under skew.
"""

from __future__ import annotations

import torch

from .grouping import group_by_expert
from .permute import permute, unpermute
from .reference import swiglu
from .router import Routing
from .strategy import StrategyResult, register_strategy


@register_strategy("padded")
def padded_moe(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor,
               capacity: int | None = None) -> StrategyResult:
    E, D = w13.shape[0], x.shape[1]
    plan = group_by_expert(r.topk_ids, E)
    C = int(plan.counts.max()) if capacity is None and E else int(capacity or 0)
    if plan.num_rows and int(plan.counts.max()) > C:
        raise ValueError(f"padded: an expert has {int(plan.counts.max())} assignments but the buffer holds C={C}")
    e_row = plan.expert_of_row()  # [N]
    r_row = plan.rank[plan.sorted_slots]  # [N] place within the expert's buffer
    buf = x.new_zeros(E, C, D)  # [E, C, D]
    buf[e_row, r_row] = permute(x, plan)
    h = torch.bmm(buf, w13.transpose(1, 2))  # [E, C, 2F]
    out = torch.bmm(swiglu(h), w2.transpose(1, 2))  # [E, C, D]
    ys = out[e_row, r_row]  # [N, D] back in grouped order
    return StrategyResult(unpermute(ys, plan, r.topk_weights), computed_rows=E * C,
                          padded_slots=E * C - plan.num_rows)
