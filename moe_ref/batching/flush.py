"""The flush rule of dynamic batching: when queued requests become one batch, and which ones it takes.

Legend: T tokens in a batch, L_i tokens of request i.
One rule, used by the live DynamicBatcher (batcher.py) and by the simulator (simulator.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..validate import check_int, check_number

__all__ = ["FlushRule"]


@dataclass(frozen=True)
class FlushRule:
    """Dispatch a batch as soon as one of these holds, checked in this order (the reason recorded):

    "full":    the queued tokens reach max_batch_tokens;
    "close":   the batcher is closing (everything queued is served);
    "timeout": max_wait seconds have passed since the oldest queued request arrived.
    The batch takes whole requests in arrival order up to max_batch_tokens, at least one: a request
    longer than that runs alone; requests are never split.
    max_batch_tokens: int >= 1. max_wait: finite seconds >= 0.
    """

    max_batch_tokens: int
    max_wait: float

    def __post_init__(self) -> None:
        check_int("max_batch_tokens", self.max_batch_tokens, low=1)
        object.__setattr__(self, "max_wait", check_number("max_wait", self.max_wait, low=0))

    def deadline(self, oldest_arrival: float) -> float:
        """The time the oldest queued request (arrived at oldest_arrival) times out."""
        return oldest_arrival + self.max_wait

    def reason(self, queued_tokens: int, oldest_arrival: float, now: float, closing: bool = False) -> str | None:
        """Why a batch goes now ("full", "close", "timeout"), or None: wait for more requests or the deadline."""
        if queued_tokens >= self.max_batch_tokens:
            return "full"
        if closing:
            return "close"
        if now >= self.deadline(oldest_arrival):
            return "timeout"
        return None

    def take(self, lengths: Iterable[int]) -> int:
        """How many of the queued requests (their token counts L_i, in arrival order) the batch takes."""
        n = tokens = 0
        for L in lengths:
            if n and tokens + L > self.max_batch_tokens:
                break
            n, tokens = n + 1, tokens + L
        return n
