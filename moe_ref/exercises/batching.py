"""Exercises of notebook 02 (dynamic batching): the flush decision, which requests a batch takes, imbalance.

Legend: T tokens in a batch, L_i tokens of request i, E experts.
Each check_* compares the reader's function with moe_ref's own: `FlushRule.reason`, `FlushRule.take`
(moe_ref/batching/flush.py) and `load_imbalance` (moe_ref/metrics.py), on edge cases included.
"""

from __future__ import annotations

import torch

from ..batching import FlushRule
from ..metrics import load_imbalance
from ._runner import Case, CheckResult, run_check

__all__ = ["check_flush_reason", "check_take", "check_load_imbalance"]


def check_flush_reason(fn, verbose: bool = True) -> CheckResult:
    """fn(queued_tokens, oldest_arrival, now, closing, max_batch_tokens, max_wait) -> a reason or None.

    The reason is checked in this order: "full" when queued_tokens >= max_batch_tokens; "close" when the
    batcher is closing; "timeout" when now >= oldest_arrival + max_wait; otherwise None (keep waiting).
    Times in seconds.
    """
    grid = [  # (name, queued_tokens, oldest_arrival, now, closing, max_batch_tokens, max_wait)
        ("exactly full", 64, 0.0, 0.0, False, 64, 0.002),
        ("nothing due yet", 10, 0.0, 0.001, False, 64, 0.002),
        ("over full and timed out: full wins", 100, 0.0, 1.0, False, 64, 0.002),
        ("closing", 5, 0.0, 0.0, True, 64, 0.002),
        ("full and closing: full wins", 70, 0.0, 0.0, True, 64, 0.002),
        ("deadline reached exactly", 5, 0.5, 0.75, False, 64, 0.25),
        ("max_wait 0: every request flushes at once", 1, 3.0, 3.0, False, 64, 0.0),
        ("max_batch_tokens 1", 1, 0.0, 0.0, False, 1, 10.0),
        ("long past the deadline", 3, 0.0, 7.5, False, 1024, 0.01),
    ]
    cases = [Case(name, dict(queued_tokens=q, oldest_arrival=a, now=n, closing=c, max_batch_tokens=m, max_wait=w),
                  FlushRule(m, w).reason(q, a, n, c)) for name, q, a, n, c, m, w in grid]
    return run_check("check_flush_reason", fn, cases, verbose=verbose,
                     hint="three ifs in the order full, close, timeout; return None when none holds.")


def check_take(fn, verbose: bool = True) -> CheckResult:
    """fn(lengths: list[int], max_batch_tokens) -> n: how many queued requests (in arrival order) the batch takes.

    Whole requests only, in order, up to max_batch_tokens tokens in total, but at least one when any is queued:
    a request longer than max_batch_tokens runs alone. An empty queue takes 0.
    """
    grid = [
        ("three fit", [3, 4, 5], 16),
        ("empty queue", [], 16),
        ("first request too long: runs alone", [40, 2, 2], 16),
        ("fills exactly", [8, 8, 1], 16),
        ("stops at the first that does not fit", [10, 7, 1], 16),
        ("one request", [5], 16),
        ("max_batch_tokens 1", [1, 1, 1], 1),
        ("many small", [1] * 20, 7),
    ]
    cases = [Case(name, dict(lengths=list(ls), max_batch_tokens=m), FlushRule(m, 0.0).take(ls))
             for name, ls, m in grid]
    return run_check("check_take", fn, cases, verbose=verbose,
                     hint="walk the lengths, keep a running total; stop before the first that overflows, "
                          "unless nothing was taken yet.")


def check_load_imbalance(fn, verbose: bool = True) -> CheckResult:
    """fn(counts [E] int64) -> float: max / mean of the per-expert loads; 1.0 when even, and when all are 0."""
    grid = [
        ("uneven", [4, 1, 0, 3]),
        ("even", [2, 2, 2, 2]),
        ("all zero (empty batch)", [0, 0, 0]),
        ("E=1", [9]),
        ("one hot expert", [30, 1, 1, 0, 0, 0, 0, 0]),
        ("odd E=7", [3, 5, 0, 1, 2, 8, 4]),
    ]
    cases = [Case(name, dict(counts=torch.tensor(c)), load_imbalance(torch.tensor(c)), rtol=1e-9, atol=1e-12)
             for name, c in grid]
    return run_check("check_load_imbalance", fn, cases, verbose=verbose,
                     hint="counts.max() / counts.float().mean(); guard the all-zero batch.")
