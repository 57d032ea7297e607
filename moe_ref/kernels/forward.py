"""The whole Triton MoE forward from x: router GEMM, fused top-k gating, alignment, expert GEMMs, combine.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
Every step stays on the device with shapes known in advance, so one call can be captured in a
CUDA graph and replayed on new inputs copied into the same buffers.
"""

from __future__ import annotations

import torch

from .fused_moe import fused_moe
from .topk_gating import topk_gating


def triton_moe_forward(x: torch.Tensor, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       top_k: int, renormalize: bool = True, scoring: str = "softmax",
                       config: dict | None = None) -> torch.Tensor:
    """y [T, D] for x [T, D], router_weight [E, D], w13 [E, 2F, D], w2 [E, D, F] (the rule of moe_ref.route)."""
    if not isinstance(router_weight, torch.Tensor) or router_weight.dim() != 2:
        raise ValueError(f"router_weight must be a [E, D] tensor, got {getattr(router_weight, 'shape', router_weight)}")
    logits = (x @ router_weight.t()).float()  # [T, E] matmul in x's dtype, scores in fp32 (as moe_ref.route)
    ids, weights = topk_gating(logits, top_k, renormalize=renormalize, scoring=scoring)  # [T, K] each
    return fused_moe(x, ids, weights, w13, w2, config=config)
