"""moe_ref.kernels: Triton kernels for the final stage (installed from kernels/ as moe_ref.kernels).

Importing this module registers strategy "triton" with moe_ref. Modules:
  align.py        align_block_size: block-aligned grouping on the device (+ torch reference)
  fused_moe.py    gather-GEMM-SwiGLU, GEMM-gate-weight, combine over K (+ torch references)
  topk_gating.py  fused softmax/sigmoid + top-k + renormalisation (+ torch reference)
  configs.py      tile configs by token count, tuned tables per GPU
  backend.py      interpreter_active(), require_backend(): where the kernels can run
  compile_check.py  compiles every kernel for sm_90 without a GPU (python -m moe_ref.kernels.compile_check)
  forward.py      the whole forward from x (router GEMM + all of the above)
On a machine without a GPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1
before importing moe_ref.kernels (it is read when the kernels are defined).
"""

if __name__ != "moe_ref.kernels":  # e.g. `import kernels` with the repo root as the working directory
    raise ImportError("this folder is moe_ref.kernels; import it as `moe_ref.kernels` "
                      "(the top-level name `kernels` belongs to Hugging Face's package)")

import torch  # noqa: E402

from moe_ref.router import Routing  # noqa: E402
from moe_ref.strategy import StrategyResult, register_strategy  # noqa: E402

from .align import AlignedPlan, align_block_size, align_block_size_torch, align_single_token  # noqa: E402
from .backend import interpreter_active, require_backend  # noqa: E402
from .configs import default_config, get_config, register_tuned_configs  # noqa: E402
from .forward import triton_moe_forward  # noqa: E402
from .fused_moe import (  # noqa: E402
    combine,
    combine_torch,
    down,
    down_torch,
    fused_moe,
    gate_up,
    gate_up_torch,
)
from .topk_gating import topk_gating, topk_gating_torch  # noqa: E402

__all__ = [
    "AlignedPlan", "align_block_size", "align_block_size_torch", "align_single_token", "combine",
    "combine_torch", "default_config", "down", "down_torch", "fused_moe", "gate_up", "gate_up_torch",
    "get_config", "interpreter_active", "register_tuned_configs", "require_backend", "topk_gating",
    "topk_gating_torch", "triton_moe", "triton_moe_forward",
]

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
