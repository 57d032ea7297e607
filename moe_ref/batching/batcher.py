"""The live dynamic batcher: concurrent `await submit(x)` calls served by batched MoE forwards.

Legend: T tokens in a batch, L_i tokens of request i, D d_model, E experts, K top-k.

Concurrency model (DynamicBatcher): asyncio, one event loop, one background worker task.
- `await b.submit(x)` validates x [L, D] at once (a bad request raises in its own caller and
  never enters the queue), queues it with a Future, and waits on that Future.
- The worker waits for the first queued request, then until the FlushRule (flush.py) says go:
  the queued tokens reach `max_batch_tokens`, or `max_wait` seconds have passed since the oldest
  queued request arrived (whichever comes first); it takes whole requests in arrival order up to
  `max_batch_tokens` (a request longer than that runs alone; requests are never split),
  concatenates them, runs ONE `layer(x_batch, strategy=..., capacity=...)`, and hands each caller
  exactly its rows.
- The forward runs in a worker thread (`asyncio.to_thread`) so the loop keeps accepting
  requests meanwhile; at most one forward runs at a time. `offload=False` runs it inline.
- A cancelled request is removed from the queue (or, if its batch is already running, its rows
  are discarded); nobody else is affected. If a batched forward raises anyway, each request of
  that batch is re-run alone so only the failing one gets the error.
- Routing is per token, so without capacity a request's rows equal `layer(x_i)` up to float
  rounding. With a CapacityConfig, C depends on the batch, so results depend on the company a
  request keeps: that is what capacity means, not a bug.
Closing (`async with` exit or `await b.close()`) serves everything still queued, then stops.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from ..config import CapacityConfig
from ..metrics import load_imbalance
from ..strategy import get_strategy
from .flush import FlushRule

__all__ = ["BatchRecord", "DynamicBatcher"]


@dataclass
class BatchRecord:
    """One forward the batcher ran.

    index: batch number (0, 1, ...); num_requests / num_tokens: what it carried (T);
    reason: "full" (max_batch_tokens reached), "timeout" (max_wait passed) or "close" (drained);
    wait_s: age of the oldest request when the batch started; compute_s: forward wall time;
    expert_counts: [E] assignments per expert (before capacity); load_imbalance: max/mean of those;
    dropped: assignments dropped by capacity (0 without); error: the exception text if it failed.
    """

    index: int
    num_requests: int
    num_tokens: int
    reason: str
    wait_s: float
    compute_s: float = 0.0
    expert_counts: list[int] = field(default_factory=list)
    load_imbalance: float = 1.0
    dropped: int = 0
    error: str | None = None


@dataclass
class _Request:
    x: torch.Tensor  # [L, D]
    future: asyncio.Future
    arrived: float


class DynamicBatcher:
    """Serve concurrent `await submit(x)` calls with batched MoE forwards (see module doc).

    layer: a moe_ref.MoELayer (anything with .cfg and __call__(x, strategy=, capacity=) -> MoEOutput).
    max_batch_tokens: flush once this many tokens are queued (int >= 1).
    max_wait: flush at the latest this many seconds after the oldest queued request (>= 0).
    rule: the FlushRule of those two (the simulator follows the same one).
    strategy / capacity: passed to every forward. offload: run forwards in a worker thread.
    batches: list[BatchRecord], one per forward, in order.
    """

    def __init__(self, layer, max_batch_tokens: int, max_wait: float, strategy: str = "grouped",
                 capacity: CapacityConfig | None = None, offload: bool = True):
        if not hasattr(layer, "cfg") or not callable(layer):
            raise TypeError(f"layer must be a moe_ref.MoELayer, got {type(layer).__name__}")
        self.rule = FlushRule(max_batch_tokens, max_wait)
        if capacity is not None and not isinstance(capacity, CapacityConfig):
            raise TypeError(f"capacity must be a moe_ref.CapacityConfig or None, got {type(capacity).__name__}")
        get_strategy(strategy)  # unknown names fail here, not in the first batch
        self.layer = layer
        self.max_batch_tokens, self.max_wait = self.rule.max_batch_tokens, self.rule.max_wait
        self.strategy = strategy
        self.capacity = capacity
        self.offload = offload
        self.batches: list[BatchRecord] = []
        self._queue: list[_Request] = []
        self._inflight: list[_Request] = []  # the batch being computed
        self._queued_tokens = 0
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False

    def summary(self) -> dict:
        """Totals over self.batches: batches, requests, tokens, mean_batch_tokens, mean_load_imbalance,
        worst_load_imbalance, dropped, failed_batches (batches whose forward raised)."""
        ok = [b for b in self.batches if b.error is None]
        n = len(self.batches)
        return dict(batches=n, requests=sum(b.num_requests for b in self.batches),
                    tokens=sum(b.num_tokens for b in self.batches),
                    mean_batch_tokens=sum(b.num_tokens for b in self.batches) / n if n else 0.0,
                    mean_load_imbalance=sum(b.load_imbalance for b in ok) / len(ok) if ok else 1.0,
                    worst_load_imbalance=max((b.load_imbalance for b in ok), default=1.0),
                    dropped=sum(b.dropped for b in ok), failed_batches=n - len(ok))

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> DynamicBatcher:
        """Start the worker task on the running loop (done by `async with`)."""
        if self._worker is None:
            self._wake = asyncio.Event()
            self._closing = False
            self._worker = asyncio.get_running_loop().create_task(self._run())
        return self

    async def close(self) -> None:
        """Serve everything still queued, then stop the worker."""
        if self._worker is None:
            return
        self._closing = True
        self._wake.set()
        worker = self._worker
        try:
            await asyncio.shield(worker)  # our own cancellation must not kill the drain
        except asyncio.CancelledError:
            if not worker.cancelled():
                raise  # the caller of close() was cancelled, not the worker
        finally:
            if worker.done():
                self._worker = None

    async def __aenter__(self) -> DynamicBatcher:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- requests --------------------------------------------------------------------------
    def _validate(self, x) -> None:
        D = self.layer.cfg.d_model
        w = self.layer.w13
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"request x must be a torch.Tensor [L, D], got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"request x must be floating point, got dtype {x.dtype}")
        if x.dim() != 2 or x.shape[1] != D:
            raise ValueError(f"request x must be [L, D] with D={D}, got shape {tuple(x.shape)}")
        if x.dtype != w.dtype:
            raise TypeError(f"request x dtype {x.dtype} does not match the layer's dtype {w.dtype}")
        if x.device != w.device:
            raise ValueError(f"request x is on {x.device} but the layer is on {w.device}")
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("request x contains NaN or inf values")

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        """Queue x [L, D] for the next batch; return its output rows [L, D] (same dtype).

        Raises TypeError/ValueError at once for a bad x (not a tensor, wrong D, dtype or device,
        NaN/inf); L = 0 returns an empty [0, D] without queueing. Cancelling the awaiting task
        removes the request from the queue.
        """
        if self._worker is None or self._closing:
            raise RuntimeError("DynamicBatcher is not running: use `async with DynamicBatcher(...) as b`")
        self._validate(x)
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        loop = asyncio.get_running_loop()
        req = _Request(x=x, future=loop.create_future(), arrived=time.perf_counter())
        self._queue.append(req)
        self._queued_tokens += x.shape[0]
        self._wake.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            self._remove(req)
            raise

    def _remove(self, req: _Request) -> None:
        """Take a cancelled request out of the queue (a no-op if its batch already took it)."""
        for i, r in enumerate(self._queue):
            if r is req:
                del self._queue[i]
                self._queued_tokens -= r.x.shape[0]
                return

    # -- worker ----------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._loop()
        except BaseException as e:  # a bug or a cancelled worker must not leave callers waiting forever
            err = e if isinstance(e, Exception) else RuntimeError(f"DynamicBatcher worker stopped: {e!r}")
            for r in self._queue + self._inflight:
                if not r.future.done():
                    r.future.set_exception(err)
            self._queue.clear()
            self._inflight = []
            self._queued_tokens = 0
            raise

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._sleep(None)
                continue
            oldest = self._queue[0].arrived  # the oldest request still queued
            reason = self.rule.reason(self._queued_tokens, oldest, time.perf_counter(), self._closing)
            if reason is None:
                await self._sleep(self.rule.deadline(oldest) - time.perf_counter())
                continue  # woken by a request or close, or timed out: look again
            batch = self._take()
            if batch:
                self._inflight = batch
                await self._serve(batch, reason)
                self._inflight = []

    async def _sleep(self, timeout: float | None) -> None:
        """Until submit() or close() sets the wake event, or `timeout` seconds pass (None: no limit)."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), None if timeout is None else max(0.0, timeout))
        except asyncio.TimeoutError:
            pass

    def _take(self) -> list[_Request]:
        """The rule's share of the queue; requests cancelled while queued are dropped first."""
        live = [r for r in self._queue if not r.future.done()]
        n = self.rule.take(r.x.shape[0] for r in live)
        batch, self._queue = live[:n], live[n:]
        self._queued_tokens = sum(r.x.shape[0] for r in self._queue)
        return batch

    def _forward(self, x: torch.Tensor):
        with torch.inference_mode():
            return self.layer(x, strategy=self.strategy, capacity=self.capacity)

    async def _call(self, x: torch.Tensor):
        return await asyncio.to_thread(self._forward, x) if self.offload else self._forward(x)

    async def _serve(self, batch: list[_Request], reason: str) -> None:
        now = time.perf_counter()
        sizes = [r.x.shape[0] for r in batch]
        rec = BatchRecord(index=len(self.batches), num_requests=len(batch), num_tokens=sum(sizes), reason=reason,
                          wait_s=now - min(r.arrived for r in batch))
        self.batches.append(rec)
        x = torch.cat([r.x for r in batch])  # [T, D]
        try:
            out = await self._call(x)
        except Exception as e:  # noqa: BLE001 - isolate the culprit below
            rec.error = f"{type(e).__name__}: {e}"
            rec.compute_s = time.perf_counter() - now
            await self._serve_alone(batch, e)
            return
        rec.compute_s = time.perf_counter() - now
        rec.expert_counts = out.stats.expert_counts.tolist()
        rec.load_imbalance = load_imbalance(out.stats.expert_counts)
        rec.dropped = out.stats.dropped
        for r, y in zip(batch, out.output.split(sizes)):
            if not r.future.done():  # skip requests cancelled while their batch ran
                r.future.set_result(y.clone())

    async def _serve_alone(self, batch: list[_Request], err: Exception) -> None:
        """A batched forward failed: give each request its own forward and its own result or error."""
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_exception(err)
            return
        for r in batch:
            if r.future.done():
                continue
            try:
                out = await self._call(r.x)
            except Exception as e:  # noqa: BLE001 - the error belongs to this request only
                if not r.future.done():
                    r.future.set_exception(e)
            else:
                if not r.future.done():
                    r.future.set_result(out.output)

