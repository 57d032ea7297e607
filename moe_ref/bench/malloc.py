"""The host allocator of a CPU benchmark process: keep freed memory, as a caching allocator does.

Legend: none (process settings in, a description out).
torch allocates CPU tensors with the C library's malloc. glibc serves a block above its mmap threshold (128 KiB
at start, rising to at most 32 MiB as blocks are freed) with a fresh mmap and gives it back to the kernel when
it is freed, so the next call of the same size faults every page in again (one zeroed 4 KiB page at a time). A
MoE layer at prefill allocates blocks that large on every call (the permuted rows: T*K*D elements, 32 MiB at
T=4096, K=8, D=512 in bf16), and on a small VM the faults can cost as much as the copy into them (a fresh 32 MiB
index_select ~11 ms, into reused memory ~2 ms on the development machine). A GPU never pays this: torch's CUDA
caching allocator keeps freed blocks for the next call, and CPU serving stacks get the same from jemalloc or
tcmalloc (torch.backends.xeon.run_cpu preloads one).

keep_freed_memory() makes glibc keep freed blocks in this process (mallopt: mmap threshold 1 GiB, trim threshold
2 GiB; the settings of MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, applied at run time), so a benchmark
times the layer's work rather than the kernel's page faults, for every provider and the bound alike. It changes
nothing it cannot describe: it returns what the process's allocator now is, to be recorded with the results.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

__all__ = ["ALLOCATOR_MODES", "KEEP_MMAP_THRESHOLD", "KEEP_TRIM_THRESHOLD", "allocator", "keep_freed_memory"]

ALLOCATOR_MODES = ("keep", "default")
KEEP_MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap, not from a fresh mmap
KEEP_TRIM_THRESHOLD = (1 << 31) - 1  # the heap goes back to the kernel only past ~2 GiB free at its top (C int max)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")

_kept = False  # set once keep_freed_memory() has changed this process's glibc settings


@functools.cache
def _glibc():
    """The C library when it is glibc (its mallopt knows the thresholds), else None; loaded once."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int  # int mallopt(int, int)
    return libc


def allocator() -> str:
    """What serves this process's host memory, in words (recorded with every CPU result)."""
    name = "glibc malloc" if _glibc() is not None else f"the C library's malloc ({platform.system()})"
    if _kept:
        return (f"{name}, freed memory kept (mallopt: mmap threshold {KEEP_MMAP_THRESHOLD >> 20} MiB, "
                f"trim threshold {(KEEP_TRIM_THRESHOLD + 1) >> 20} MiB)")
    env = [f"{k}={os.environ[k]}" for k in _ENV if os.environ.get(k)]
    return f"{name}, {'environment ' + ' '.join(env) if env else 'default settings'}"


def keep_freed_memory() -> str:
    """Make glibc keep freed blocks for reuse in this process; returns allocator(). Raises where it cannot."""
    global _kept
    libc = _glibc()
    if libc is None:
        raise RuntimeError(f"keeping freed memory needs glibc's mallopt; this process runs on "
                           f"{platform.system()} {platform.libc_ver()[0] or 'without glibc'}: "
                           "use the default allocator (--malloc default) or preload jemalloc/tcmalloc")
    if not (libc.mallopt(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                   KEEP_TRIM_THRESHOLD)):
        raise RuntimeError("glibc's mallopt refused the thresholds; use --malloc default")
    _kept = True
    return allocator()
