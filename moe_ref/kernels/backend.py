"""Where the kernels can run: a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET=1 at import).

Legend: SM streaming multiprocessors; smem shared memory (bytes).
Nothing here touches triton.runtime.driver, so it is safe on machines without a GPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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


def _version(v: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in v.split(".")[:2]]
    major, minor = (parts + [0, 0])[:2]
    return major, minor


@functools.lru_cache(maxsize=None)  # pure in its arguments; require_backend asks on every launch
def interpreter_incompatibility(triton_version: str, numpy_version: str) -> str | None:
    """Why this Triton's interpreter cannot run the kernels with this numpy, or None if it can.

    Triton 3.6 and older call int() on 1-element numpy arrays inside the interpreter, an error since
    numpy 2.4 ("only 0-dimensional arrays can be converted to Python scalars"). Measured: with numpy 2.4.6,
    triton 3.6.0 fails every test that launches a kernel (32 of 57) and passes them all with numpy 2.3.5;
    triton 3.7.1, 3.8.0 and 3.9.0 pass them all with numpy 2.4.6.
    """
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter does not work with numpy {numpy_version} (it converts "
                f"1-element arrays with int(), an error since numpy 2.4): install triton>=3.7 or numpy<2.4")
    return None


class DeviceLimits(NamedTuple):
    """What tile configs are sized against: SMs to fill with programs, shared memory one block may use."""

    sm_count: int  # streaming multiprocessors
    smem_per_block: int  # bytes of shared memory one block may use (the opt-in maximum)


# H100 / H200 (sm_90): 132 SMs, 227 KiB of shared memory per block; used without a CUDA device (compile_check
# for sm_90, the interpreter) and wherever torch does not report the opt-in maximum of a Hopper GPU
SM90_LIMITS = DeviceLimits(sm_count=132, smem_per_block=232448)


def device_limits(device: torch.device | str | None = None) -> DeviceLimits:
    """The SM count and per-block shared memory of a CUDA device (torch.cuda.get_device_properties);
    SM90_LIMITS for anything else (None, the CPU, the interpreter)."""
    if isinstance(device, str):
        device = torch.device(device)
    if device is None or device.type != "cuda":
        return SM90_LIMITS
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    props = torch.cuda.get_device_properties(index)
    if hasattr(props, "shared_memory_per_block_optin"):
        smem = props.shared_memory_per_block_optin
    elif props.major == 9:
        smem = SM90_LIMITS.smem_per_block
    else:  # the default per-block limit every CUDA GPU has (48 KiB): small tiles, but they launch
        smem = getattr(props, "shared_memory_per_block", 48 * 1024)
    return DeviceLimits(sm_count=props.multi_processor_count, smem_per_block=int(smem))


def require_backend(x: torch.Tensor) -> None:
    """Raise a clear RuntimeError unless x can be processed: on a CUDA device, or under a working interpreter."""
    if interpreter_active():
        import numpy

        why = interpreter_incompatibility(triton.__version__, numpy.__version__)
        if why:
            raise RuntimeError(why)
        return
    if x.is_cuda:
        return
    gpu = ("a CUDA device is present, so move x and the layer there (layer.cuda())" if torch.cuda.is_available()
           else "no CUDA device is available here")
    raise RuntimeError(f"{ENABLE_HINT}. The input is on {x.device} and {gpu}.")


# Host-side integer helpers for the launchers. Plain Python on purpose: triton.cdiv and
# triton.next_power_of_2 are jit-wrapped in Triton 3.9 and cost ~7 us a call on the host, which at decode
# sizes adds up to a noticeable share of a whole MoE layer.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0, as triton.next_power_of_2)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
