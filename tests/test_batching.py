"""Dynamic batching: the asyncio DynamicBatcher and the Poisson simulator (moe_ref.batching)."""

import asyncio
import math
import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_ref
from helpers import assert_close, examples, make_case
from moe_ref.batching import DynamicBatcher, FlushRule, simulate_dynamic_batching

pytestmark = pytest.mark.timeout(60)

D = 16


@pytest.fixture(scope="module")
def layer():
    return make_case(1, D, 12, 8, 2, dtype=torch.float64)[0]


def rows(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class SlowLayer(torch.nn.Module):
    """Wraps a layer: sleeps before each forward, and fails any batch holding a row whose x[0] == 1234."""

    def __init__(self, inner, delay=0.0):
        super().__init__()
        self.inner, self.delay, self.calls = inner, delay, []
        self.cfg, self.w13 = inner.cfg, inner.w13

    def forward(self, x, **kw):
        self.calls.append(x.shape[0])
        time.sleep(self.delay)
        if bool((x[:, 0] == 1234.0).any()):
            raise RuntimeError("poisoned row")
        return self.inner(x, **kw)


def check_batches(b, lengths, max_tokens):
    served = [n for n in lengths if n > 0]
    assert sum(r.num_requests for r in b.batches) == len(served)
    assert sum(r.num_tokens for r in b.batches) == sum(served)
    for r in b.batches:
        assert r.num_tokens <= max_tokens or r.num_requests == 1
        assert sum(r.expert_counts) == r.num_tokens * 2 and r.load_imbalance >= 1.0


def test_many_concurrent_requests_get_their_own_rows(layer):
    rng = random.Random(0)
    lengths = [rng.randint(0, 40) for _ in range(60)]
    xs = [rows(n, i) for i, n in enumerate(lengths)]

    async def client(b, x, delay):
        await asyncio.sleep(delay)
        return await b.submit(x)

    async def main():
        async with DynamicBatcher(layer, max_batch_tokens=128, max_wait=0.01) as b:
            ys = await asyncio.gather(*[client(b, x, rng.random() * 0.05) for x in xs])
        return b, ys

    b, ys = asyncio.run(main())
    for x, y in zip(xs, ys):
        assert y.shape == x.shape and y.dtype == x.dtype
        assert_close(y, layer(x).output)  # routing is per token: same rows as a forward of its own
    check_batches(b, lengths, 128)
    summ = b.summary()
    assert (summ["requests"], summ["tokens"], summ["failed_batches"]) == (
        sum(n > 0 for n in lengths), sum(lengths), 0)
    assert len(b.batches) > 1 and max(r.num_requests for r in b.batches) > 1  # really batched


def test_bad_requests_fail_alone(layer):
    good = [rows(n, 10 + n) for n in (3, 7, 5)]
    bad = {"wrong D": (torch.randn(4, D + 1, dtype=torch.float64), ValueError, "D=16"),
           "wrong dtype": (torch.randn(4, D), TypeError, "dtype"),
           "not a tensor": ([[0.0] * D], TypeError, "torch.Tensor"),
           "integer": (torch.ones(2, D, dtype=torch.long), TypeError, "floating"),
           "nan": (torch.full((2, D), float("nan"), dtype=torch.float64), ValueError, "NaN")}

    async def main():
        async with DynamicBatcher(layer, max_batch_tokens=64, max_wait=0.02) as b:
            jobs = [b.submit(x) for x in good] + [b.submit(x) for x, _, _ in bad.values()]
            return await asyncio.gather(*jobs, return_exceptions=True)

    out = asyncio.run(main())
    for x, y in zip(good, out[:3]):
        assert_close(y, layer(x).output)
    for (name, (_, err, words)), got in zip(bad.items(), out[3:]):
        assert isinstance(got, err) and words in str(got), (name, got)


def test_failing_forward_fails_only_its_request(layer):
    slow = SlowLayer(layer)
    poison = rows(3, 1)
    poison[1, 0] = 1234.0  # finite: passes validation, but this layer's forward rejects it
    good = [rows(n, 20 + n) for n in (2, 6, 4)]

    async def main():
        async with DynamicBatcher(slow, max_batch_tokens=1000, max_wait=0.02) as b:
            return b, await asyncio.gather(*[b.submit(x) for x in [good[0], poison, *good[1:]]],
                                           return_exceptions=True)

    b, out = asyncio.run(main())
    assert isinstance(out[1], RuntimeError) and "poisoned" in str(out[1])
    for x, y in zip(good, [out[0], *out[2:]]):
        assert_close(y, layer(x).output)
    assert b.batches[0].error and "poisoned" in b.batches[0].error
    assert b.summary()["failed_batches"] == 1
    assert slow.calls[0] == 15 and sorted(slow.calls[1:]) == [2, 3, 4, 6]  # batch, then each alone


def test_cancelled_request_is_removed_and_others_served(layer):
    xs = [rows(n, 30 + n) for n in (4, 5, 6)]

    async def main():
        async with DynamicBatcher(layer, max_batch_tokens=1000, max_wait=0.2) as b:
            tasks = [asyncio.create_task(b.submit(x)) for x in xs]
            await asyncio.sleep(0.02)  # all three queued, nothing flushed yet
            tasks[1].cancel()
            res = await asyncio.gather(*tasks, return_exceptions=True)
        return b, res

    b, res = asyncio.run(main())
    assert isinstance(res[1], asyncio.CancelledError)
    assert_close(res[0], layer(xs[0]).output)
    assert_close(res[2], layer(xs[2]).output)
    assert [(r.num_requests, r.num_tokens) for r in b.batches] == [(2, 10)]  # the cancelled rows never ran


def test_cancel_while_batch_runs(layer):
    slow = SlowLayer(layer, delay=0.3)
    xs = [rows(n, 40 + n) for n in (3, 4)]

    async def main():
        async with DynamicBatcher(slow, max_batch_tokens=7, max_wait=5.0) as b:
            tasks = [asyncio.create_task(b.submit(x)) for x in xs]
            await asyncio.sleep(0.1)  # the batch (full at 7 tokens) is now in its forward
            tasks[0].cancel()
            res = await asyncio.gather(*tasks, return_exceptions=True)
            after = await b.submit(rows(7, 5))  # the batcher still works (7 tokens: a full batch)
        return res, after

    res, after = asyncio.run(main())
    assert isinstance(res[0], asyncio.CancelledError)
    assert_close(res[1], layer(xs[1]).output)
    assert_close(after, layer(rows(7, 5)).output)


def test_stopped_worker_fails_waiting_callers(layer):
    async def main():
        async with DynamicBatcher(layer, max_batch_tokens=1000, max_wait=30.0) as b:
            task = asyncio.create_task(b.submit(rows(3, 0)))
            await asyncio.sleep(0.02)
            b._worker.cancel()  # simulate a dead worker: the caller must hear about it, not hang
            with pytest.raises(RuntimeError, match="worker stopped"):
                await task

    asyncio.run(main())


def test_worker_stopped_mid_forward_fails_that_batch(layer):
    slow = SlowLayer(layer, delay=0.3)

    async def main():
        async with DynamicBatcher(slow, max_batch_tokens=3, max_wait=30.0) as b:
            task = asyncio.create_task(b.submit(rows(3, 0)))  # full at once: its forward starts
            await asyncio.sleep(0.1)
            b._worker.cancel()
            with pytest.raises(RuntimeError, match="worker stopped"):
                await task

    asyncio.run(main())


def test_max_wait_flush(layer):
    async def main():
        async with DynamicBatcher(layer, max_batch_tokens=10_000, max_wait=0.15) as b:
            t0 = time.perf_counter()
            y = await b.submit(rows(3, 0))
            return b, y, time.perf_counter() - t0

    b, y, dt = asyncio.run(main())
    assert 0.15 <= dt < 5.0  # waited for max_wait, not for the token budget or the close
    assert b.batches[0].reason == "timeout" and b.batches[0].wait_s >= 0.15
    assert_close(y, layer(rows(3, 0)).output)


def test_max_batch_tokens_flush(layer):
    async def main():
        async with DynamicBatcher(layer, max_batch_tokens=16, max_wait=30.0) as b:
            t0 = time.perf_counter()
            ys = await asyncio.gather(*[b.submit(rows(4, i)) for i in range(4)])
            dt = time.perf_counter() - t0
            late = asyncio.create_task(b.submit(rows(4, 9)))  # alone: waits until the close drains it
            await asyncio.sleep(0.05)
            assert not late.done()
        return b, ys, dt, late.result()

    b, ys, dt, late = asyncio.run(main())
    assert dt < 10.0  # far less than max_wait: the token budget flushed the batch
    assert [(r.num_requests, r.num_tokens, r.reason) for r in b.batches] == [(4, 16, "full"), (1, 4, "close")]
    for i, y in enumerate(ys):
        assert_close(y, layer(rows(4, i)).output)
    assert_close(late, layer(rows(4, 9)).output)


def test_long_request_runs_alone_and_empty_request(layer):
    async def main():
        async with DynamicBatcher(layer, max_batch_tokens=8, max_wait=0.01, offload=False) as b:
            big, empty = await asyncio.gather(b.submit(rows(20, 1)), b.submit(rows(0, 2)))
        return b, big, empty

    b, big, empty = asyncio.run(main())
    assert_close(big, layer(rows(20, 1)).output)
    assert empty.shape == (0, D)
    assert [(r.num_requests, r.num_tokens) for r in b.batches] == [(1, 20)]


def test_batcher_bad_arguments(layer):
    with pytest.raises(ValueError, match="max_batch_tokens"):
        DynamicBatcher(layer, max_batch_tokens=0, max_wait=0.1)
    with pytest.raises(ValueError, match="max_wait"):
        DynamicBatcher(layer, max_batch_tokens=8, max_wait=-1)
    with pytest.raises(ValueError, match="strategy"):
        DynamicBatcher(layer, max_batch_tokens=8, max_wait=0.1, strategy="magic")
    with pytest.raises(TypeError, match="capacity"):
        DynamicBatcher(layer, max_batch_tokens=8, max_wait=0.1, capacity=1.25)
    with pytest.raises(TypeError, match="layer"):
        DynamicBatcher("layer", max_batch_tokens=8, max_wait=0.1)
    b = DynamicBatcher(layer, max_batch_tokens=8, max_wait=0.1)
    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(b.submit(rows(2, 0)))


# ---------------------------------------------------------------------------------------------
# the flush rule: one rule, followed by the batcher and the simulator
# ---------------------------------------------------------------------------------------------


def test_flush_rule_reasons_in_order():
    rule = FlushRule(max_batch_tokens=16, max_wait=0.5)
    assert rule.deadline(2.0) == 2.5
    assert rule.reason(15, oldest_arrival=2.0, now=2.4) is None  # neither full nor timed out: wait
    assert rule.reason(16, 2.0, 2.4) == "full"
    assert rule.reason(16, 2.0, 9.0, closing=True) == "full"  # full is checked before close and timeout
    assert rule.reason(3, 2.0, 2.4, closing=True) == "close"
    assert rule.reason(3, 2.0, 9.0, closing=True) == "close"
    assert rule.reason(3, 2.0, 2.5) == "timeout"  # at the deadline, not only after it
    assert FlushRule(8, 0).reason(1, 5.0, 5.0) == "timeout"  # max_wait 0: no waiting
    assert [FlushRule(8, 0.1).take(q) for q in ([], [3, 4, 5], [8, 1], [20, 1], [1, 20])] == [0, 2, 1, 1, 1]


@given(lengths=st.lists(st.integers(1, 40), max_size=12), max_tokens=st.integers(1, 64))
def test_flush_rule_takes_whole_requests_up_to_the_budget(lengths, max_tokens):
    n = FlushRule(max_tokens, 0.1).take(iter(lengths))  # any iterable of L_i, in arrival order
    assert n == 0 if not lengths else 1 <= n <= len(lengths)  # at least one: a long request runs alone
    if n > 1:
        assert sum(lengths[:n]) <= max_tokens
    if n < len(lengths):
        assert sum(lengths[:n + 1]) > max_tokens  # the next request would not fit


@pytest.mark.parametrize("args, exc, err", [
    ((0, 0.1), ValueError, "max_batch_tokens"), ((True, 0.1), TypeError, "max_batch_tokens"),
    ((8.0, 0.1), TypeError, "max_batch_tokens"), ((8, -1.0), ValueError, "max_wait"),
    ((8, math.inf), ValueError, "max_wait"), ((8, "1"), TypeError, "max_wait")])
def test_flush_rule_bad_arguments(args, exc, err):
    with pytest.raises(exc, match=err):
        FlushRule(*args)


def test_batcher_and_simulator_share_the_rule(layer):
    b = DynamicBatcher(layer, max_batch_tokens=8, max_wait=0.25)
    assert b.rule == FlushRule(8, 0.25) and (b.max_batch_tokens, b.max_wait) == (8, 0.25)


@settings(max_examples=examples(30), deadline=None)
@given(rate=st.sampled_from([20.0, 500.0, 5000.0]), max_tokens=st.sampled_from([1, 8, 64, 512]),
       max_wait=st.sampled_from([0.0, 0.001, 0.02]), seed=st.integers(0, 1000))
def test_simulator_dispatches_each_batch_at_the_rules_first_yes(rate, max_tokens, max_wait, seed):
    s = simulate_dynamic_batching(CFG, arrival_rate=rate, num_requests=40, max_batch_tokens=max_tokens,
                                  max_wait=max_wait, request_len=(1, 24), seed=seed, time_per_row_s=1e-6)
    rule, arr, lens = FlushRule(max_tokens, max_wait), s.arrivals, s.lengths
    free = 0.0
    for b in s.batches:
        i, t = b["first_request"], b["start"]
        queued = [L for a, L in zip(arr[i:], lens[i:]) if a <= t]  # arrived by the start, not yet served
        assert b["reason"] == rule.reason(sum(queued), arr[i], t) and b["num_requests"] == rule.take(queued)
        ready = max(free, arr[i])  # the server is free and the oldest request is there
        assert t >= ready
        for e in [ready] * (ready < t) + [a for a in arr[i:] if ready < a < t]:  # each earlier moment it wakes
            assert rule.reason(sum(L for a, L in zip(arr[i:], lens[i:]) if a <= e), arr[i], e) is None
        free = b["end"]


# ---------------------------------------------------------------------------------------------
# simulator
# ---------------------------------------------------------------------------------------------

CFG = moe_ref.MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2)


def test_simulator_is_deterministic_and_conserves_requests():
    kw = dict(arrival_rate=3000.0, num_requests=400, max_batch_tokens=256, max_wait=0.004, request_len=(1, 48))
    a = simulate_dynamic_batching(CFG, seed=3, **kw)
    b = simulate_dynamic_batching(CFG, seed=3, **kw)
    c = simulate_dynamic_batching(CFG, seed=4, **kw)
    assert a.batches == b.batches and a.latencies == b.latencies
    assert a.latencies != c.latencies
    assert sum(x["num_requests"] for x in a.batches) == 400
    assert len(a.latencies) == 400 and min(a.latencies) > 0
    for x in a.batches:
        assert x["num_tokens"] <= 256 or x["num_requests"] == 1
        assert sum(x["expert_counts"]) == 2 * x["num_tokens"] and x["end"] > x["start"]
        want = a.params["batch_overhead_s"] + a.params["time_per_row_s"] * 2 * x["num_tokens"]  # cost "sum"
        assert x["compute_s"] == pytest.approx(want)
    starts = [x["start"] for x in a.batches]
    assert all(e0 <= s1 for e0, s1 in zip([x["end"] for x in a.batches], starts[1:]))  # one server
    assert a.p50_latency_s <= a.p99_latency_s and a.throughput_tokens_per_s > 0


def test_bigger_batches_even_out_load_on_average_but_guarantee_nothing():
    sims = [simulate_dynamic_batching(CFG, arrival_rate=5000.0, num_requests=600, max_batch_tokens=m,
                                      max_wait=0.01, request_len=(1, 16), seed=0) for m in (8, 64, 512)]
    sizes = [s.mean_batch_tokens for s in sims]
    imb = [s.mean_load_imbalance for s in sims]
    assert sizes[0] < sizes[1] < sizes[2]
    assert imb[0] > imb[1] > imb[2], imb
    assert sims[-1].worst_load_imbalance > 1.0  # still uneven: no guarantee
    # within one run, small batches are more uneven than big ones on average
    mixed = simulate_dynamic_batching(CFG, arrival_rate=300.0, num_requests=800, max_batch_tokens=256,
                                      max_wait=0.01, request_len=(1, 32), seed=1)
    by_size = sorted(mixed.batches, key=lambda b: b["num_tokens"])
    half = len(by_size) // 2
    small = [b["load_imbalance"] for b in by_size[:half]]
    large = [b["load_imbalance"] for b in by_size[half:]]
    assert by_size[half - 1]["num_tokens"] < by_size[-1]["num_tokens"]
    assert sum(small) / len(small) > sum(large) / len(large)


def test_simulator_cost_max_and_with_a_layer():
    layer = moe_ref.MoELayer(CFG, seed=0)
    s = simulate_dynamic_batching(layer, arrival_rate=2000.0, num_requests=100, max_batch_tokens=64,
                                  max_wait=0.002, skew=1.0, cost="max", time_per_row_s=1e-6, batch_overhead_s=0.0)
    for b in s.batches:
        assert b["compute_s"] == pytest.approx(1e-6 * 8 * max(b["expert_counts"]))  # the busiest expert paces
    assert s.mean_load_imbalance > 1.5  # skew 1 through the layer's biased router


def test_simulator_low_rate_waits_max_wait():
    s = simulate_dynamic_batching(CFG, arrival_rate=1.0, num_requests=20, max_batch_tokens=10_000,
                                  max_wait=0.05, request_len=4, seed=0, time_per_row_s=0.0, batch_overhead_s=0.0)
    # requests ~1 s apart: a batch starts max_wait after its oldest request and costs nothing
    assert all(b["reason"] == "timeout" for b in s.batches)
    for b in s.batches:
        first = b["first_request"]
        assert b["start"] == pytest.approx(s.arrivals[first] + 0.05)
        assert s.latencies[first] == pytest.approx(0.05)
        for r in range(first, first + b["num_requests"]):
            assert s.arrivals[r] <= b["start"] and s.latencies[r] <= 0.05 + 1e-12
    assert s.lengths == [4] * 20 and sum(b["num_requests"] for b in s.batches) == 20


@pytest.mark.parametrize("kw,err", [
    (dict(arrival_rate=0.0), "arrival_rate"), (dict(num_requests=0), "num_requests"),
    (dict(max_batch_tokens=0), "max_batch_tokens"), (dict(max_wait=-0.1), "max_wait"),
    (dict(request_len=(5, 2)), "request_len"), (dict(request_len="lots"), "request_len"),
    (dict(cost="min"), "cost")])
def test_simulator_bad_arguments(kw, err):
    args = dict(arrival_rate=100.0, num_requests=10, max_batch_tokens=64, max_wait=0.01) | kw
    with pytest.raises(ValueError, match=err):
        simulate_dynamic_batching(CFG, **args)
    with pytest.raises(TypeError, match="layer_or_cfg"):
        simulate_dynamic_batching("cfg", **args)
