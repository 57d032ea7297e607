"""The definitional ground truth every strategy is checked against.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
y[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t]),  expert_e(x) = w2[e] @ (silu(g) * u),
[g; u] = w13[e] @ x (rows 0..F-1 of w13[e] are the gate, rows F..2F-1 the up projection).
Written per token, for clarity rather than speed; run it in float64 for a trusted answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from .router import Routing, check_x2d, validate_routing


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """[..., 2F] -> [..., F]: silu(gate) * up."""
    g, u = gu.chunk(2, dim=-1)
    return Fn.silu(g) * u


def expert_ffn(x: torch.Tensor, w13_e: torch.Tensor, w2_e: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert on rows x [n, D] with w13_e [2F, D], w2_e [D, F] -> [n, D]."""
    return swiglu(x @ w13_e.t()) @ w2_e.t()


def check_weights(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int]:
    """Validate expert weights against x [T, D]; return (E, D, F)."""
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor, got {getattr(w, 'shape', type(w).__name__)}")
    E, F2, D = w13.shape
    if F2 % 2 or tuple(w2.shape) != (E, D, F2 // 2):
        raise ValueError(f"w13 must be [E, 2F, D] and w2 [E, D, F]; got w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}")
    check_x2d(x, D)
    if not (x.dtype == w13.dtype == w2.dtype):
        raise TypeError(f"dtype mismatch: x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}")
    if not (x.device == w13.device == w2.device):
        raise ValueError(f"device mismatch: x {x.device}, w13 {w13.device}, w2 {w2.device}")
    return E, D, F2 // 2


def reference_moe(x: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Ground-truth MoE output [T, D] for x [T, D]. Assignments with id -1 (dropped) add nothing."""
    E, D, F = check_weights(x, w13, w2)
    validate_routing(routing, x.shape[0], E, allow_dropped=True)
    y = torch.zeros_like(x)  # [T, D]
    ids = routing.topk_ids  # [T, K]
    w = routing.topk_weights.to(x.dtype if x.dtype == torch.float64 else torch.float32)  # [T, K]
    for t in range(x.shape[0]):
        keep = ids[t] >= 0  # [K]
        if not bool(keep.any()):
            continue
        e = ids[t][keep]  # [k']
        gu = torch.einsum("kfd,d->kf", w13[e], x[t])  # [k', 2F]
        out = torch.einsum("kdf,kf->kd", w2[e], swiglu(gu))  # [k', D]
        y[t] = (out.to(w.dtype) * w[t][keep, None]).sum(0).to(x.dtype)
    return y
