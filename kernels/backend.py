"""Where the kernels can run: a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET=1 at import).

Nothing here touches triton.runtime.driver, so it is safe on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _probe(x_ptr):  # x_ptr: unused; only its decorated type matters
    tl.store(x_ptr, 0)


def interpreter_active() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when they were defined)."""
    return type(_probe).__name__ == "InterpretedFunction"


ENABLE_HINT = ("the Triton kernels need a CUDA GPU, or Triton's CPU interpreter: set the environment variable "
               "TRITON_INTERPRET=1 before importing moe_ref.kernels (e.g. `TRITON_INTERPRET=1 python ...`, or "
               "os.environ['TRITON_INTERPRET'] = '1' at the top of a notebook, before any moe_ref.kernels import); "
               "the interpreter is slow, so keep shapes tiny")


def require_backend(x: torch.Tensor) -> None:
    """Raise a clear RuntimeError unless x can be processed: on a CUDA device, or under the interpreter."""
    if interpreter_active() or x.is_cuda:
        return
    gpu = ("a CUDA device is present, so move x and the layer there (layer.cuda())" if torch.cuda.is_available()
           else "no CUDA device is available here")
    raise RuntimeError(f"{ENABLE_HINT}. The input is on {x.device} and {gpu}.")
