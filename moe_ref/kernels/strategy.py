"""Strategy "triton": MoELayer's forward through the fused kernels.

Legend: T tokens, D d_model, E experts, K top-k. Routing ids of -1 (dropped by capacity) take
the sentinel path: they are skipped by the alignment and contribute zero in the combine.
"""

from __future__ import annotations

import torch

from moe_ref.router import Routing
from moe_ref.strategy import StrategyResult, register_strategy

from .backend import require_backend
from .fused_moe import fused_moe


@register_strategy("triton")
def triton_moe(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor,
               capacity: int | None = None) -> StrategyResult:
    """Strategy "triton": fused_moe on the routing (ids -1, dropped by capacity, go through the sentinel path)."""
    require_backend(x)
    y, plan = fused_moe(x, r.topk_ids, r.topk_weights, w13, w2, return_plan=True)
    # statistics only (the kernels themselves never wait for the host)
    computed = int((plan.expert_ids >= 0).sum()) * plan.block_m
    kept = int((r.topk_ids >= 0).sum())
    return StrategyResult(y, computed_rows=computed, padded_slots=computed - kept)
