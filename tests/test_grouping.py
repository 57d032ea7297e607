"""Grouping and permutation invariants."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import moe_ref
from moe_ref import grouping


@st.composite
def routings(draw):
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 80))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(0, K, dtype=torch.long)
    if T:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K] distinct per row
    if draw(st.booleans()) and T:
        ids[torch.rand(T, K, generator=g) < 0.2] = -1  # some dropped
    return ids, E


@given(routings())
def test_plan_invariants(case):
    ids, E = case
    T, K = ids.shape
    plan = moe_ref.group_by_expert(ids, E)
    valid = ids.reshape(-1) >= 0
    assert int(plan.counts.sum()) == int(valid.sum()) == plan.num_rows
    assert plan.offsets[0] == 0 and torch.equal(plan.offsets[1:], plan.counts.cumsum(0))
    # the plan is a permutation of the kept slots, grouped by expert, token order inside an expert
    assert sorted(plan.sorted_slots.tolist()) == valid.nonzero().squeeze(1).tolist()
    flat = ids.reshape(-1)
    e_rows = flat[plan.sorted_slots]
    assert torch.equal(e_rows, plan.expert_of_row())
    for e in range(E):
        blk = plan.sorted_slots[plan.offsets[e]:plan.offsets[e + 1]]
        assert torch.all(blk[1:] > blk[:-1])
    assert torch.equal(plan.token_ids, plan.sorted_slots // K)
    assert torch.equal(plan.inverse[plan.sorted_slots], torch.arange(plan.num_rows))
    assert torch.all(plan.inverse[~valid] == -1)


@given(routings())
def test_argsort_and_counting_sort_agree(case):
    ids, E = case
    a = moe_ref.group_by_expert(ids, E, method="argsort")
    c = moe_ref.group_by_expert(ids, E, method="counting")
    for f in ("counts", "offsets", "sorted_slots", "token_ids", "inverse", "rank"):
        assert torch.equal(getattr(a, f), getattr(c, f)), f


@given(st.integers(0, 20_000), st.integers(1, 2**15 - 1), st.sampled_from([torch.int16, torch.int32, torch.int64]),
       st.integers(0, 10_000))
def test_stable_sort_matches_torch(S, E, dtype, seed):
    """The CPU fast path (numpy's radix sort of int16 keys) and torch's stable sort give the same order."""
    from moe_ref.grouping import stable_sort
    key = torch.randint(0, E, (S,), generator=torch.Generator().manual_seed(seed)).to(dtype)
    got, order = stable_sort(key)
    want, want_order = torch.sort(key, stable=True)
    assert got.dtype == dtype and order.dtype == torch.int64
    assert torch.equal(got, want) and torch.equal(order, want_order)


def test_stable_sort_under_inference_mode():
    from moe_ref.grouping import stable_sort
    with torch.inference_mode():
        key = torch.tensor([3, 1, 3, 0, 1], dtype=torch.int16)
        got, order = stable_sort(key)
    assert order.tolist() == [3, 1, 4, 0, 2] and got.tolist() == [0, 1, 1, 3, 3]


@given(routings())
def test_permute_unpermute_roundtrip(case):
    ids, E = case
    T, K = ids.shape
    x = torch.randn(T, 5, dtype=torch.float64)
    plan = moe_ref.group_by_expert(ids, E)
    xs = moe_ref.permute(x, plan)
    w = torch.rand(T, K)
    y = moe_ref.unpermute(xs, plan, w)  # identity experts: y = sum of kept weights * x
    kept = torch.where(ids >= 0, w.double(), 0).sum(1, keepdim=True)
    torch.testing.assert_close(y, kept * x)


@given(routings(), st.integers(0, 7), st.integers(0, 10_000))
@example(case=(torch.tensor([[-1]]), 1), extra=0, seed=0)  # every slot dropped: nothing to read
def test_unpermute_reads_rows_from_wherever_they_lie(case, extra, seed):
    """unpermute(..., rows=): grouped row i read from ys[rows[i]] (a padded layout) gives the same bits."""
    ids, E = case
    T, K = ids.shape
    g = torch.Generator().manual_seed(seed)
    plan = moe_ref.group_by_expert(ids, E)
    N = plan.num_rows
    ys = torch.randn(N, 5, generator=g)
    rows = torch.randperm(N + extra, generator=g)[:N]  # [N] each grouped row's place among N + extra
    big = torch.full((N + extra, 5), float("nan"))  # the rows no one points at must never be read
    big[rows] = ys
    w = torch.rand(T, K, generator=g)
    assert torch.equal(moe_ref.unpermute(big, plan, w, rows=rows), moe_ref.unpermute(ys, plan, w))
    with pytest.raises(ValueError, match="rows"):
        moe_ref.unpermute(big, plan, w, rows=rows[:-1] if N else torch.zeros(1, dtype=torch.long))


def test_bad_method_and_ids():
    with pytest.raises(ValueError, match="method"):
        moe_ref.group_by_expert(torch.zeros(2, 1, dtype=torch.long), 2, method="bogus")
    with pytest.raises(ValueError, match="topk_ids values"):
        moe_ref.group_by_expert(torch.tensor([[5]]), 2)
    with pytest.raises(TypeError):
        moe_ref.group_by_expert(torch.zeros(2, 1), 2)


@given(routings())
def test_the_small_python_plan_equals_the_vectorised_one(case):
    ids, E = case
    from moe_ref import grouping
    small = moe_ref.group_by_expert(ids, E)  # T*K <= SMALL_SLOTS on the CPU: built in Python
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grouping, "SMALL_SLOTS", 0)
        big = moe_ref.group_by_expert(ids, E)
    for f in ("counts", "offsets", "sorted_slots", "token_ids", "inverse", "rank"):
        a, b = getattr(small, f), getattr(big, f)
        assert a.dtype == b.dtype and torch.equal(a, b), f


def test_the_small_plan_checks_the_ids():
    with pytest.raises(ValueError, match=r"in \[-1, 3\], got \[0, 4\]"):
        moe_ref.group_by_expert(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match=r"got \[-2, 1\]"):
        moe_ref.group_by_expert(torch.tensor([[-2, 1]]), 4)


@given(routings(), st.integers(0, 10_000))
def test_combine_slots_is_unpermute_given_each_slots_row(case, seed):
    """combine_slots (the combine on its own: a row of ys per slot, -1 where dropped) gives unpermute's bits."""
    ids, E = case
    T, K = ids.shape
    g = torch.Generator().manual_seed(seed)
    plan = moe_ref.group_by_expert(ids, E)
    ys = torch.randn(plan.num_rows, 5, generator=g).bfloat16()
    w = torch.rand(T, K, generator=g)
    want = moe_ref.unpermute(ys, plan, w)
    for dropped in (None, plan.num_rows < T * K):
        assert torch.equal(moe_ref.combine_slots(ys, plan.inverse, w, dropped=dropped), want)
    with pytest.raises(ValueError, match="slot_rows"):
        moe_ref.combine_slots(ys, plan.inverse[:-1] if T * K else torch.zeros(1, dtype=torch.long), w)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_ref.combine_slots(ys, plan.inverse, w.reshape(-1))


@given(routings())
def test_slot_counts_are_the_plans_counts(case):
    ids, E = case
    plan = moe_ref.group_by_expert(ids, E)
    counts, dropped = grouping.slot_counts(ids, E)
    assert counts == plan.counts.tolist() and dropped == bool((ids < 0).any())
    for small in (64, 0):  # counted and built in Python, or vectorised
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(grouping, "SMALL_SLOTS", small)
            assert grouping.slot_counts(ids, E) == (counts, dropped), small
            rp = grouping.row_plan(ids, E, counts, dropped)
            assert torch.equal(rp.token_ids, plan.token_ids) and torch.equal(rp.slot_rows, plan.inverse), small
            assert rp.token_ids.dtype == rp.slot_rows.dtype == torch.long, small
            assert torch.equal(grouping.slot_order(ids, E, dropped)[:plan.num_rows], plan.sorted_slots), small


@pytest.mark.parametrize("small", [64, 0])  # counted in Python, or vectorised
def test_slot_counts_checks_the_ids_as_the_plan_does(small, monkeypatch):
    monkeypatch.setattr(grouping, "SMALL_SLOTS", small)
    with pytest.raises(ValueError, match=r"topk_ids values must be in \[-1, 1\]"):
        grouping.slot_counts(torch.tensor([[2]]), 2)
    with pytest.raises(ValueError, match="topk_ids values"):
        grouping.slot_counts(torch.tensor([[-2, 0]]), 2)
    with pytest.raises(TypeError, match="integer"):
        grouping.slot_counts(torch.zeros(2, 1), 2)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        grouping.slot_counts(torch.zeros(3, dtype=torch.long), 2)


@given(routings())
def test_the_padded_plan_puts_each_grouped_row_where_the_dispatch_plan_says(case):
    """padded_plan (from the routing alone) against group_by_expert + padded_rows: the same padded row for each
    grouped row, the token of each padded row, and the padded row of each slot (-1 dropped)."""
    from moe_ref import grouped
    ids, E = case
    T, K = ids.shape
    sizes, dropped = grouping.slot_counts(ids, E)
    if not any(sizes):
        return  # no padded layout without rows (the strategy takes its "empty" way)
    plan = moe_ref.group_by_expert(ids, E)
    rows = grouped.padded_rows(plan.offsets.tolist(), sizes)
    p = grouped.padded_plan(ids, sizes, dropped)
    assert (p.rows.experts, p.rows.capacity, p.dropped) == (rows.experts, rows.capacity, dropped)
    assert torch.equal(p.rows.dest, rows.dest)
    src = torch.zeros(rows.experts * rows.capacity, dtype=torch.long)
    src[rows.dest] = plan.token_ids
    assert torch.equal(p.src, src)
    want = torch.where(plan.inverse >= 0, rows.dest[plan.inverse.clamp(min=0)], -1)
    assert torch.equal(p.slot_rows, want)
