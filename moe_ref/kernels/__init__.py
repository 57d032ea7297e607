"""moe_ref.kernels: Triton kernels for the final stage.

Importing this module registers strategy "triton" with moe_ref. Modules:
  align.py        align_block_size: block-aligned grouping on the device (+ torch reference)
  fused_moe.py    gather-GEMM-SwiGLU, GEMM-gate-weight, combine over K (+ torch references)
  topk_gating.py  fused softmax/sigmoid + top-k + renormalisation (+ torch reference)
  configs.py      tile configs by token count, tuned tables per GPU (load_tuned_configs; tuned/*.json ship)
  backend.py      interpreter_active(), require_backend(): where the kernels can run; device_limits()
                  (SM count, shared memory per block) that configs are fitted to
  compile_check.py  compiles every kernel for sm_90 without a GPU and audits it for 32-bit pointer
                  offsets (python -m moe_ref.kernels.compile_check)
  forward.py      the whole forward from x (router GEMM + all of the above)
  strategy.py     strategy "triton" for MoELayer (registered on import)
On a machine without a GPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1
before importing moe_ref.kernels (it is read when the kernels are defined).
"""

from .align import AlignedPlan, align_block_size, align_block_size_torch, align_single_token
from .backend import interpreter_active, require_backend
from .configs import default_config, get_config, load_tuned_configs, register_tuned_configs
from .forward import triton_moe_forward
from .fused_moe import (
    combine,
    combine_torch,
    down,
    down_torch,
    fused_moe,
    gate_up,
    gate_up_torch,
)
from .strategy import triton_moe
from .topk_gating import topk_gating, topk_gating_torch

__all__ = [
    "AlignedPlan", "align_block_size", "align_block_size_torch", "align_single_token", "combine",
    "combine_torch", "default_config", "down", "down_torch", "fused_moe", "gate_up", "gate_up_torch",
    "get_config", "interpreter_active", "load_tuned_configs", "register_tuned_configs", "require_backend",
    "topk_gating", "topk_gating_torch", "triton_moe", "triton_moe_forward",
]
