"""Timing, through the libraries the field trusts: triton.testing.do_bench on CUDA, torch.utils.benchmark elsewhere.

Legend: none (callables in, milliseconds out).
Timer(device)(fn) -> {median_ms, p20_ms, p80_ms, min_ms, reps}:
  CUDA: triton.testing.do_bench(fn, warmup, rep, quantiles=[0.5, 0.2, 0.8]) (CUDA events, the L2 cache
        flushed before each call; the same signature in triton 3.6 and 3.9);
        torch.utils.benchmark when triton is absent (it synchronises CUDA around each block of calls);
  CPU:  torch.utils.benchmark.Timer.blocked_autorange(min_run_time=budget): medians of blocks of calls.
time_cpu(fns, rounds, threads) is the one CPU harness: torch's thread count pinned (and recorded) for the run,
every callable timed once per round by torch.utils.benchmark, the rounds interleaved across callables (one
busy moment of the machine hits all of them alike) in an order shuffled round by round (no callable always
inherits the caches of the same neighbour), the median and the interquartile range of each kept.
paired_ratio(a, b) compares two of its timings round by round: the median of a's time over b's in the same
round, so a slow phase of the machine that spans a round slows both sides of each ratio alike; paired_ratio_ci(a, b)
gives the distribution-free 95 % interval of that median (median_ci: two order statistics of the per-round ratios),
so that a verdict against a limit can say whether the limit lies within the machine's noise; extend(timing, more)
appends the rounds of a later time_cpu call (more rounds of a few callables where a verdict needs them), and two
timings pair the rounds they share. after(setup, fn) marks a callable whose every timed call follows an untimed
setup() (a step of a pipeline timed in the state the step before it leaves, not in the warm caches of a loop of it).
distrust(timed, bound) names what cannot be trusted: a callable faster than its own bound by more than
BEAT_BOUND (paired), or a spread (IQR / median) over WIDE_SPREAD; warn_if_busy prints it.
"""

from __future__ import annotations

import functools
import gc
import math
import random
import statistics
from typing import Callable

import torch
import torch.utils.benchmark as tb

from ..roofline import H200_BF16_FLOPS, H200_HBM_BPS

__all__ = ["Timer", "time_cpu", "after", "extend", "paired_ratio", "paired_ratio_ci", "median_ci", "median_ci_coverage",
           "distrust", "warn_if_busy", "BUSY", "BEAT_BOUND", "WIDE_SPREAD",
           "summary", "measure_limits", "progress", "resolve_device", "free_memory"]

TIMER_MODES = ("auto", "do_bench", "torch")
ORDER_SEED = 0  # time_cpu's shuffles of the order, round by round


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


BEAT_BOUND = 0.05  # a result this much faster than its own bound is impossible: the bound was disturbed
WIDE_SPREAD = 0.20  # IQR / median above which a timing is too noisy to compare
BUSY = "the machine looks busy (another process on these cores?): these numbers can't be trusted"


def after(setup: Callable[[], object], fn: Callable[[], object]) -> Callable[[], object]:
    """fn, marked so that time_cpu's default clock runs setup() untimed right before each call it times (and once
    before the two untimed calls Timer.timeit makes first): a step of a pipeline timed in the state the step before it
    leaves it in. Called directly it is just fn (same name and result). The bench times the grouped strategy's plan,
    gather and combine this way, each right after the GEMM-only bound: in a forward each follows GEMMs that have
    streamed the expert weights through the caches, and there small ops cost several times what they cost in a loop
    of themselves (a first numpy reduction of 64 KiB ~70 µs against ~3 µs, measured on the AMD EPYC dev machine)."""
    def timed():
        return fn()

    functools.update_wrapper(timed, fn)
    timed.setup = setup
    return timed


def _benchmark_clock(fn: Callable[[], object], threads: int) -> Callable[[], float]:
    """One torch.utils.benchmark Timer.timeit(1) per call; a callable made by after() has its setup run first,
    untimed (Timer's setup statement: run once per timeit call, outside the timed loop)."""
    setup = getattr(fn, "setup", None)
    t = tb.Timer(stmt="fn()", setup="setup()" if setup is not None else "pass", globals={"fn": fn, "setup": setup},
                 num_threads=threads)
    return lambda: t.timeit(1).median


def time_cpu(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 2, threads: int | None = None,
             clock: Callable[[Callable[[], object], int], Callable[[], float]] | None = None) -> dict[str, dict]:
    """{name: {median_s, iqr_s, times_s, threads}}: every fn timed once per round, the rounds interleaved across fns.

    The order is shuffled from round to round (seeded: the same orders on every run), so no fn always runs right
    after the same other one, whose caches or freed memory it would inherit every time. (Rotating one fixed order
    would not do: it keeps every fn behind the same neighbour. It kept the bench's bound behind hf_batched_mm, which
    gathers hundreds of MiB of weights, and the bound came out slower than strategies that contain it.)
    threads: torch's intra-op thread count for the run (default: the current one), set before and restored
    after. clock(fn, threads) -> a function returning the seconds of one call of fn (default: one
    torch.utils.benchmark Timer.timeit(1) per call); tests pass a fake one. Timer.timeit(1) first runs fn twice
    untimed (its own warm-up), so each timed call follows two calls of the same fn: the interleaving keeps what one
    provider leaves in the caches and the allocator away from another's timed call, and each timed call sees what
    its own calls leave, as in a loop of that one call. (Timing single calls with nothing before them instead, by
    timeit.Timer, moved the grouped strategy's ratio to its bound by at most 0.09 at cpu-fine bf16
    T=1024 and 4096, on the dev machine.) A callable made by after(setup, fn) is timed right after an untimed
    setup() instead.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    before = torch.get_num_threads()
    threads = before if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    clock = clock or _benchmark_clock
    torch.set_num_threads(threads)
    try:
        clocks = {n: clock(f, threads) for n, f in fns.items()}
        for _ in range(warmup):
            for f in fns.values():
                f()
        times: dict[str, list[float]] = {n: [] for n in fns}
        order, rng = list(clocks), random.Random(ORDER_SEED)
        for _ in range(rounds):
            rng.shuffle(order)  # a new order each round: each fn follows different ones
            for n in order:
                times[n].append(clocks[n]())
    finally:
        torch.set_num_threads(before)
    return {n: _stats(ts, threads) for n, ts in times.items()}


def _paired(a: dict, b: dict) -> list[float] | None:
    """The per-round ratios a_i / b_i over the rounds both timings were in, or None without per-round times.

    time_cpu's round i is one round for every callable timed in it, and extend only appends later rounds (to some
    callables of a run): so two timings of one run share their first min(len) rounds, which are the ones paired."""
    ta, tb_ = a.get("times_s"), b.get("times_s")
    if not (ta and tb_):
        return None
    n = min(len(ta), len(tb_))
    if not all(t > 0 for t in tb_[:n]):
        return None
    return [x / y for x, y in zip(ta[:n], tb_[:n])]


def paired_ratio(a: dict, b: dict) -> float:
    """a over b for two timings of one time_cpu run: the median of the per-round ratios a_i / b_i, over the rounds
    both were timed in (where extend gave one of them more).

    Timings without per-round times fall back to the ratio of the medians.
    """
    ratios = _paired(a, b)
    return statistics.median(ratios) if ratios else a["median_s"] / b["median_s"]


def extend(timing: dict, more: dict) -> dict:
    """One time_cpu timing with the rounds of a later time_cpu call of the same callable appended (the bench's
    confirming rounds): times_s joined, the median and IQR taken over all of them."""
    if timing.get("threads") != more.get("threads"):
        raise ValueError(f"extend joins rounds run with the same thread count, got {timing.get('threads')} and "
                         f"{more.get('threads')}")
    return _stats(list(timing["times_s"]) + list(more["times_s"]), timing["threads"])


def _stats(ts: list[float], threads: int) -> dict:
    s = sorted(ts)
    return dict(median_s=statistics.median(s), iqr_s=_quantile(s, 0.75) - _quantile(s, 0.25), times_s=ts,
                threads=threads)


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(lo, hi, coverage): the distribution-free interval for the median of these values, two order statistics
    x(j) <= x(n+1-j) of the n sorted values with j the largest for which P(Binomial(n, 1/2) < j) <= (1 -
    confidence) / 2; coverage = 1 - 2 P(Binomial(n, 1/2) < j), at least `confidence` from n = 6 (at 0.95). Below
    that no such j exists and the interval is the whole range (min, max) with its own, lower coverage. Assumes
    only that the values are independent draws of one distribution: no normality (timings are skewed)."""
    n = len(values)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    j, coverage = _median_rank(n, confidence)
    xs = sorted(values)
    return xs[j - 1], xs[n - j], coverage


def median_ci_coverage(n: int, confidence: float = 0.95) -> float:
    """The coverage median_ci states for n values (it depends on n alone)."""
    if n < 1:
        raise ValueError(f"median_ci_coverage needs n >= 1, got {n}")
    return _median_rank(n, confidence)[1]


def _median_rank(n: int, confidence: float) -> tuple[int, float]:
    """(j, coverage) of median_ci for n values: the 1-based order statistic and its binomial coverage."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    below = [math.comb(n, i) / 2**n for i in range(n + 1)]  # P(B = i)
    j, tail = 1, below[0]  # j: the 1-based order statistic; tail: P(B < j)
    while j + 1 <= (n + 1) // 2 and tail + below[j] <= (1 - confidence) / 2:
        tail += below[j]
        j += 1
    return j, 1 - 2 * tail


def paired_ratio_ci(a: dict, b: dict, confidence: float = 0.95) -> tuple[float, float, float] | None:
    """median_ci of the per-round ratios a_i / b_i behind paired_ratio(a, b); None without per-round times."""
    ratios = _paired(a, b)
    return None if not ratios else median_ci(ratios, confidence)


def distrust(timed: dict[str, dict], bound: str | None = None) -> dict[str, str]:
    """{name: why} for each timing of time_cpu that cannot be trusted (see BEAT_BOUND, WIDE_SPREAD).

    With `bound` (the name of the lower-bound callable), any other callable faster than it by more than
    BEAT_BOUND (paired_ratio) is flagged: nothing can beat its own bound, so the bound's rounds were disturbed.
    """
    if bound is not None and bound not in timed:
        raise KeyError(f"bound {bound!r} is not among the timings {sorted(timed)}")
    out = {}
    for name, t in timed.items():
        med, iqr = t["median_s"], t["iqr_s"]
        ratio = paired_ratio(t, timed[bound]) if bound is not None and name != bound else None
        if ratio is not None and ratio < 1 - BEAT_BOUND:
            out[name] = f"{ratio:.2f}x its own bound (faster than possible)"
        elif med > 0 and iqr > WIDE_SPREAD * med:
            out[name] = f"spread {100 * iqr / med:.0f} % of the median (IQR)"
    return out


def warn_if_busy(flags: dict[str, str], where: str = "") -> bool:
    """Print one warning naming every flagged timing; True when there was anything to warn about."""
    if not flags:
        return False
    items = "; ".join(f"{n}: {why}" for n, why in flags.items())
    print(f"WARNING{' (' + where + ')' if where else ''}: {BUSY}. {items}")
    return True


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

