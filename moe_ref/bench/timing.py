"""Timing, through the libraries the field trusts: triton.testing.do_bench on CUDA, torch.utils.benchmark elsewhere.

Legend: none (callables in, milliseconds out).
Timer(device)(fn) -> {median_ms, p20_ms, p80_ms, min_ms, reps}:
  CUDA: triton.testing.do_bench(fn, warmup, rep, quantiles=[0.5, 0.2, 0.8]) (CUDA events, the L2 cache
        flushed before each call; the same signature in triton 3.6 and 3.9);
        torch.utils.benchmark when triton is absent (it synchronises CUDA around each block of calls);
  CPU:  torch.utils.benchmark.Timer.blocked_autorange(min_run_time=budget): medians of blocks of calls.
time_cpu(fns, rounds) times several callables interleaved round by round (one busy moment of the machine
hits all of them alike) and keeps the median and the interquartile range of each.
"""

from __future__ import annotations

import gc
import statistics
from typing import Callable

import torch
import torch.utils.benchmark as tb

from ..roofline import H200_BF16_FLOPS, H200_HBM_BPS

__all__ = ["Timer", "time_cpu", "summary", "measure_limits", "progress", "resolve_device", "free_memory"]

TIMER_MODES = ("auto", "do_bench", "torch")


def _quantile(sorted_ts: list[float], q: float) -> float:
    i = q * (len(sorted_ts) - 1)
    lo, hi = int(i), min(int(i) + 1, len(sorted_ts) - 1)
    return sorted_ts[lo] + (sorted_ts[hi] - sorted_ts[lo]) * (i - lo)


def summary(ts_ms: list[float]) -> dict:
    """Median, 20th/80th percentiles, min and count of times in ms."""
    ts = sorted(ts_ms)
    return dict(median_ms=statistics.median(ts), p20_ms=_quantile(ts, 0.2), p80_ms=_quantile(ts, 0.8),
                min_ms=ts[0], reps=len(ts))


def _have_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


class Timer:
    """Times fn() on `device` for about budget_ms; see the module doc for the method per device."""

    def __init__(self, device, mode: str = "auto", budget_ms: float = 100.0, min_reps: int = 3):
        if mode not in TIMER_MODES:
            raise ValueError(f"timer mode must be one of {TIMER_MODES}, got {mode!r}")
        device = resolve_device(device)
        self.device, self.cuda = device, device.type == "cuda"
        if mode == "do_bench" and not self.cuda:
            raise ValueError("timer mode 'do_bench' needs a CUDA device")
        if mode == "auto":
            mode = "do_bench" if self.cuda and _have_triton() else "torch"
        self.mode, self.budget_ms, self.min_reps = mode, budget_ms, min_reps

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> dict:
        if self.mode == "do_bench":
            import triton.testing

            med, p20, p80 = triton.testing.do_bench(fn, warmup=max(1, int(self.budget_ms / 4)),
                                                    rep=max(1, int(self.budget_ms)), quantiles=[0.5, 0.2, 0.8])
            return dict(median_ms=med, p20_ms=p20, p80_ms=p80, min_ms=None, reps=None)
        m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        ms = m.blocked_autorange(min_run_time=self.budget_ms * 1e-3)
        ts = [t * 1e3 for t in ms.times]  # per-call ms of each block
        while len(ts) < self.min_reps:  # slow calls: blocked_autorange may stop after one block
            ts.append(m.timeit(1).median * 1e3)
        return summary(ts)


def time_cpu(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 2) -> dict[str, dict]:
    """{name: {median_s, iqr_s, times_s}}: every fn timed once per round, the rounds interleaved across fns.

    Each timing is one torch.utils.benchmark call of fn (threads as torch.get_num_threads()).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    timers = {n: tb.Timer(stmt="fn()", globals={"fn": f}, num_threads=torch.get_num_threads()) for n, f in fns.items()}
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, t in timers.items():
            times[n].append(t.timeit(1).median)
    out = {}
    for n, ts in times.items():
        s = sorted(ts)
        out[n] = dict(median_s=statistics.median(s), iqr_s=_quantile(s, 0.75) - _quantile(s, 0.25), times_s=ts)
    return out


def resolve_device(device) -> torch.device:
    """torch.device with an explicit index for CUDA ('cuda' -> 'cuda:<current>')."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def free_memory(device) -> None:
    """Collect garbage and return cached CUDA blocks (between shapes, after an OOM)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def progress(total: int, enabled: bool = True, desc: str = "bench"):
    """A tqdm bar over `total` cases (disabled: the same object, silent)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="case", disable=not enabled)


def measure_limits(device: torch.device, dtype: torch.dtype, timer: Timer, copy_bytes: int = 1 << 30,
                   matmul_sizes=(4096, 8192)) -> dict:
    """The device's measured copy bandwidth (bytes/s, read + write) and best dense matmul rate (FLOP/s)."""
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = timer(lambda d=dst, s=src: d.copy_(s))["median_ms"]
    del src, dst
    best, best_n = 0.0, None
    for n in matmul_sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=c)
        t = timer(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c))["median_ms"]
        rate = 2 * n**3 / (t * 1e-3)
        if rate > best:
            best, best_n = rate, n
        del a, b, c
    free_memory(device)
    return dict(copy_Bps=2 * copy_bytes / (t_copy * 1e-3), copy_bytes=copy_bytes, matmul_flops=best,
                matmul_n=best_n, matmul_dtype=str(dtype).replace("torch.", ""), nominal_hbm_Bps=H200_HBM_BPS,
                nominal_matmul_flops=H200_BF16_FLOPS)

