"""Dynamic batching: gather concurrent requests into one MoE forward, and a simulator of it.

Legend: T tokens in a batch, L_i tokens of request i, D d_model, E experts, K top-k.

Why: an MoE layer's experts each see only the tokens routed to them. One small request gives
each expert a handful of rows (poor GEMMs, uneven load); gathering many requests into one
forward gives every expert more rows and, statistically, a more even share, but nothing
guarantees it: a batch can still be skewed (the seed's point, measured by the simulator).

Concurrency model (DynamicBatcher): asyncio, one event loop, one background worker task.
- `await b.submit(x)` validates x [L, D] at once (a bad request raises in its own caller and
  never enters the queue), queues it with a Future, and waits on that Future.
- The worker waits for the first queued request, then until the queued tokens reach
  `max_batch_tokens` or `max_wait` seconds have passed since that first request arrived
  (whichever comes first), takes whole requests in arrival order up to `max_batch_tokens`
  (a request longer than that runs alone; requests are never split), concatenates them, runs
  ONE `layer(x_batch, strategy=..., capacity=...)`, and hands each caller exactly its rows.
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
import math
import time
from dataclasses import dataclass, field

import torch

from .config import CapacityConfig, MoEConfig
from .metrics import coefficient_of_variation, load_imbalance

__all__ = ["BatchRecord", "DynamicBatcher", "BatchingSimulation", "simulate_dynamic_batching"]


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
    max_wait: flush at the latest this many seconds after the first queued request (>= 0).
    strategy / capacity: passed to every forward. offload: run forwards in a worker thread.
    batches: list[BatchRecord], one per forward, in order.
    """

    def __init__(self, layer, max_batch_tokens: int, max_wait: float, strategy: str = "grouped",
                 capacity: CapacityConfig | None = None, offload: bool = True):
        if not hasattr(layer, "cfg") or not callable(layer):
            raise TypeError(f"layer must be a moe_ref.MoELayer, got {type(layer).__name__}")
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be an int >= 1, got {max_batch_tokens!r}")
        if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) or not (0 <= max_wait < math.inf):
            raise ValueError(f"max_wait must be a finite number of seconds >= 0, got {max_wait!r}")
        if capacity is not None and not isinstance(capacity, CapacityConfig):
            raise TypeError(f"capacity must be a moe_ref.CapacityConfig or None, got {type(capacity).__name__}")
        from .strategy import get_strategy

        get_strategy(strategy)  # unknown names fail here, not in the first batch
        self.layer = layer
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = float(max_wait)
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
                self._wake.clear()
                await self._wake.wait()
                continue
            reason = None
            while reason is None:
                deadline = self._queue[0].arrived + self.max_wait  # the oldest request still queued
                if self._queued_tokens >= self.max_batch_tokens:
                    reason = "full"
                elif self._closing:
                    reason = "close"
                elif time.perf_counter() >= deadline:
                    reason = "timeout"
                else:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - time.perf_counter()))
                    except asyncio.TimeoutError:
                        pass
                    if not self._queue:  # everything queued was cancelled
                        break
            if reason is None:
                continue
            batch = self._take()
            if batch:
                self._inflight = batch
                await self._serve(batch, reason)
                self._inflight = []

    def _take(self) -> list[_Request]:
        """Whole requests in arrival order, up to max_batch_tokens (at least one)."""
        batch, tokens = [], 0
        while self._queue:
            L = self._queue[0].x.shape[0]
            if batch and tokens + L > self.max_batch_tokens:
                break
            r = self._queue.pop(0)
            self._queued_tokens -= L
            if r.future.done():  # cancelled while queued
                continue
            batch.append(r)
            tokens += L
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


# ---------------------------------------------------------------------------------------------
# Simulator: Poisson arrivals, the same flush rule, a deterministic cost model.
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchingSimulation:
    """Result of simulate_dynamic_batching (times in simulated seconds).

    batches: one dict per batch: index, first_request (its requests are first_request ..
        first_request + num_requests - 1), start (s), end (s), num_requests, num_tokens,
        reason ("full": max_batch_tokens were queued by the start, else "timeout"), compute_s,
        expert_counts [E] list, load_imbalance (max/mean), cv (std/mean of expert loads), max_load, mean_load.
    latencies: per request, completion time minus arrival time (s), in arrival order.
    arrivals, lengths: per request, arrival time (s) and tokens L_i, in arrival order.
    throughput_tokens_per_s: tokens served / (last completion - first arrival).
    mean_latency_s, p50_latency_s, p99_latency_s: over requests.
    mean_batch_tokens: average tokens per batch; mean_load_imbalance: average over batches;
    worst_load_imbalance: the largest max/mean seen in any batch (no guarantee: it can stay high).
    params: the arguments, for the record.
    """

    batches: list[dict]
    latencies: list[float]
    arrivals: list[float]
    lengths: list[int]
    throughput_tokens_per_s: float
    mean_latency_s: float
    p50_latency_s: float
    p99_latency_s: float
    mean_batch_tokens: float
    mean_load_imbalance: float
    worst_load_imbalance: float
    params: dict


def _draw_lengths(request_len, n: int, g: torch.Generator) -> list[int]:
    if isinstance(request_len, int) and not isinstance(request_len, bool):
        if request_len < 1:
            raise ValueError(f"request_len must be >= 1, got {request_len}")
        return [request_len] * n
    if isinstance(request_len, tuple) and len(request_len) == 2:
        lo, hi = request_len
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"request_len (lo, hi) must be ints with 1 <= lo <= hi, got {request_len}")
        return torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    if isinstance(request_len, str) and request_len.startswith("geometric:"):
        mean = float(request_len.split(":", 1)[1])
        if not mean >= 1:
            raise ValueError(f"request_len 'geometric:MEAN' needs MEAN >= 1, got {mean}")
        u = torch.rand(n, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        p = 1.0 / mean
        return (torch.floor(torch.log(u) / math.log1p(-p)) + 1).long().tolist() if p < 1 else [1] * n
    if callable(request_len):
        out = [int(request_len(g)) for _ in range(n)]
        if min(out, default=1) < 1:
            raise ValueError("request_len() must return ints >= 1")
        return out
    raise ValueError("request_len must be an int, a (lo, hi) tuple of ints, 'geometric:MEAN', "
                     f"or a callable(generator) -> int; got {request_len!r}")


def simulate_dynamic_batching(layer_or_cfg, arrival_rate: float, num_requests: int, max_batch_tokens: int,
                              max_wait: float, request_len=(1, 64), seed: int = 0, skew: float = 0.0,
                              time_per_row_s: float | None = None, batch_overhead_s: float = 1e-4,
                              cost: str = "sum", flops_per_s: float = 1e11) -> BatchingSimulation:
    """Simulate the DynamicBatcher's flush rule on Poisson arrivals, with a deterministic cost model.

    layer_or_cfg: a MoELayer (its router routes random tokens, biased by `skew` via skewed_routing)
        or a MoEConfig (tokens routed by random_routing with `skew`). Either way loads are real
        top-k routings of every token, so per-batch expert loads are what a real batch would see.
    arrival_rate: requests per second (Poisson: exponential gaps). num_requests: how many.
    request_len: int, (lo, hi) uniform ints, "geometric:MEAN", or callable(torch.Generator) -> int.
    Flush rule (as DynamicBatcher): one server; a batch starts when the server is free and either
        max_batch_tokens are queued or max_wait passed since its oldest request; it takes whole
        requests in arrival order up to max_batch_tokens.
    Cost model (deterministic): compute_s = batch_overhead_s + time_per_row_s * rows, where
        rows = T*K ("sum": experts run one after another) or E * max expert load ("max": experts
        run in parallel, so the busiest one sets the pace: imbalance costs time). time_per_row_s
        defaults to 6*D*F / flops_per_s (one token through one SwiGLU expert).
    """
    from .layer import MoELayer
    from .skew import random_routing, skewed_routing
    from .stats import expert_counts

    if isinstance(layer_or_cfg, MoELayer):
        cfg, layer = layer_or_cfg.cfg, layer_or_cfg
    elif isinstance(layer_or_cfg, MoEConfig):
        cfg, layer = layer_or_cfg, None
    else:
        raise TypeError(f"layer_or_cfg must be a MoELayer or MoEConfig, got {type(layer_or_cfg).__name__}")
    if not (isinstance(arrival_rate, (int, float)) and 0 < arrival_rate < math.inf):
        raise ValueError(f"arrival_rate must be a finite number > 0 (requests/s), got {arrival_rate!r}")
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise ValueError(f"num_requests must be an int >= 1, got {num_requests!r}")
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be an int >= 1, got {max_batch_tokens!r}")
    if not (isinstance(max_wait, (int, float)) and 0 <= max_wait < math.inf):
        raise ValueError(f"max_wait must be a finite number >= 0, got {max_wait!r}")
    if cost not in ("sum", "max"):
        raise ValueError(f"cost must be 'sum' or 'max', got {cost!r}")
    E, K = cfg.num_experts, cfg.top_k
    per_row = time_per_row_s if time_per_row_s is not None else cfg.expert_flops_per_row() / flops_per_s

    g = torch.Generator().manual_seed(int(seed))
    gaps = torch.empty(num_requests, dtype=torch.float64).exponential_(arrival_rate, generator=g)
    arrivals = torch.cumsum(gaps, 0).tolist()  # [N] seconds
    lengths = _draw_lengths(request_len, num_requests, g)
    total = sum(lengths)
    if layer is not None:
        chunks = []
        w = layer.router_weight
        with torch.inference_mode():
            for lo in range(0, total, 8192):  # random tokens through the layer's (biased) router
                x = torch.randn(min(8192, total - lo), cfg.d_model, generator=g).to(w.dtype).to(w.device)
                chunks.append(skewed_routing(x, w, K, skew, renormalize=cfg.renormalize,
                                             scoring=cfg.scoring).topk_ids.cpu())
        ids = torch.cat(chunks)  # [sum L, K]
    else:
        ids = random_routing(total, E, K, skew=skew, seed=int(seed) + 1).topk_ids  # [sum L, K]
    starts = [0]
    for L in lengths:
        starts.append(starts[-1] + L)

    batches, done = [], [0.0] * num_requests
    free, i = 0.0, 0  # server free time, next request not yet batched
    while i < num_requests:
        # when would the queue (from request i on) reach max_batch_tokens?
        tokens, j, t_full = 0, i, math.inf
        while j < num_requests:
            tokens += lengths[j]
            if tokens >= max_batch_tokens:
                t_full = arrivals[j]
                break
            j += 1
        t_timeout = arrivals[i] + max_wait
        start = max(free, arrivals[i], min(t_full, t_timeout))
        reason = "full" if t_full <= start else "timeout"
        # take whole requests that have arrived by `start`, in order, up to max_batch_tokens
        j, tokens = i, 0
        while j < num_requests and arrivals[j] <= start:
            if j > i and tokens + lengths[j] > max_batch_tokens:
                break
            tokens += lengths[j]
            j += 1
        cnt = expert_counts(ids[starts[i]:starts[j]], E)  # [E]
        rows = tokens * K if cost == "sum" else E * int(cnt.max())
        compute = batch_overhead_s + per_row * rows
        end = start + compute
        for r in range(i, j):
            done[r] = end
        batches.append(dict(index=len(batches), first_request=i, start=start, end=end, num_requests=j - i,
                            num_tokens=tokens,
                            reason=reason, compute_s=compute, expert_counts=cnt.tolist(),
                            load_imbalance=load_imbalance(cnt), cv=coefficient_of_variation(cnt),
                            max_load=int(cnt.max()), mean_load=float(cnt.double().mean())))
        free, i = end, j
    lat = [d - a for d, a in zip(done, arrivals)]
    lat_sorted = sorted(lat)

    def pct(q):
        return lat_sorted[min(len(lat_sorted) - 1, max(0, math.ceil(q * len(lat_sorted)) - 1))]

    span = max(done) - arrivals[0]
    imbs = [b["load_imbalance"] for b in batches]
    return BatchingSimulation(
        batches=batches, latencies=lat, arrivals=arrivals, lengths=lengths,
        throughput_tokens_per_s=total / span if span > 0 else math.inf,
        mean_latency_s=sum(lat) / len(lat), p50_latency_s=pct(0.5), p99_latency_s=pct(0.99),
        mean_batch_tokens=total / len(batches), mean_load_imbalance=sum(imbs) / len(imbs),
        worst_load_imbalance=max(imbs),
        params=dict(arrival_rate=arrival_rate, num_requests=num_requests, max_batch_tokens=max_batch_tokens,
                    max_wait=max_wait, request_len=repr(request_len), seed=seed, skew=skew, cost=cost,
                    time_per_row_s=per_row, batch_overhead_s=batch_overhead_s,
                    num_experts=E, top_k=K))
