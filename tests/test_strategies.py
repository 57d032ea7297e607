"""Every strategy equals the float64 reference wherever nothing is dropped."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moe_ref
from helpers import assert_close, configs, hand_routing, make_case
from moe_ref import cpu_gemm, grouped
from moe_ref.grouped import expert_blocks, grouped_steps

TORCH_STRATEGIES = ["dense", "loop", "grouped", "grouped_mm", "padded"]
F64 = ["dense", "loop", "grouped", "padded"]  # grouped_mm has no float64 kernel


def run(layer, x, strategy, routing=None):
    """Run strategy; grouped_mm computes in float32 from the float64 case."""
    if strategy == "grouped_mm" and x.dtype == torch.float64:
        layer32 = moe_ref.MoELayer(layer.cfg, dtype=torch.float32)
        layer32.load_state_dict(layer.state_dict())
        r = routing or layer.route(x.reshape(-1, x.shape[-1]))
        return layer32(x.float(), strategy=strategy, routing=r), torch.float32
    return layer(x, strategy=strategy, routing=routing), x.dtype


@pytest.mark.parametrize("strategy", TORCH_STRATEGIES)
@given(cfg=configs())
def test_strategy_matches_reference(strategy, cfg):
    T, D, F, E, K, renorm, seed = cfg
    layer, x = make_case(T, D, F, E, K, seed=seed, renormalize=renorm)
    r = layer.route(x)
    want = moe_ref.reference_moe(x, r, layer.w13, layer.w2)
    out, dt = run(layer, x, strategy, r)
    assert out.output.shape == x.shape
    assert_close(out.output, want, dt, msg=f"strategy={strategy} T={T} D={D} F={F} E={E} K={K}")
    s = out.stats
    assert int(s.expert_counts.sum()) == T * K and s.dropped == 0 and s.capacity is None


@pytest.mark.parametrize("strategy", TORCH_STRATEGIES)
def test_odd_sizes(strategy):
    layer, x = make_case(511, 33, 222, 8, 2, seed=3)
    r = layer.route(x)
    out, dt = run(layer, x, strategy, r)
    assert_close(out.output, moe_ref.reference_moe(x, r, layer.w13, layer.w2), dt)


@pytest.mark.parametrize("strategy", TORCH_STRATEGIES)
def test_one_hot_expert_and_empty_experts(strategy):
    layer, x = make_case(40, 16, 8, 6, 2, seed=1)
    ids = torch.stack([torch.zeros(40, dtype=torch.long), torch.ones(40, dtype=torch.long)], 1)  # experts 2..5 empty
    r = hand_routing(ids, torch.rand(40, 2, generator=torch.Generator().manual_seed(0)))
    out, dt = run(layer, x, strategy, r)
    assert_close(out.output, moe_ref.reference_moe(x, r, layer.w13, layer.w2), dt)
    assert out.stats.expert_counts.tolist() == [40, 40, 0, 0, 0, 0]


@pytest.mark.parametrize("strategy", TORCH_STRATEGIES)
def test_3d_input_keeps_shape_and_dtype(strategy):
    layer, x = make_case(24, 16, 8, 4, 2)
    x3 = x.view(2, 12, 16)
    out, dt = run(layer, x3, strategy)
    assert out.output.shape == (2, 12, 16)
    r = layer.route(x)
    assert_close(out.output.reshape(24, 16), moe_ref.reference_moe(x, r, layer.w13, layer.w2), dt)


@pytest.mark.parametrize("strategy", F64 + ["grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_float64(strategy, dtype):
    layer, x = make_case(64, 32, 16, 8, 2, seed=5)
    r = layer.route(x)
    want = moe_ref.reference_moe(x, r, layer.w13, layer.w2)
    low = moe_ref.MoELayer(layer.cfg, dtype=dtype)
    low.load_state_dict(layer.state_dict())
    out = low(x.to(dtype), strategy=strategy, routing=r)
    assert out.output.dtype == dtype
    assert_close(out.output, want, dtype)


@pytest.mark.parametrize("strategy", TORCH_STRATEGIES)
def test_deterministic(strategy):
    layer, x = make_case(200, 16, 8, 8, 2, dtype=torch.float32, seed=2)
    a = layer(x, strategy=strategy).output
    b = layer(x, strategy=strategy).output
    assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", TORCH_STRATEGIES)
def test_empty_input_returns_empty(strategy):
    layer, x = make_case(0, 16, 8, 4, 2, dtype=torch.float32)
    out = layer(x, strategy=strategy)
    assert out.output.shape == (0, 16) and out.stats.expert_counts.tolist() == [0, 0, 0, 0]


def test_dense_wastes_e_over_k():
    layer, x = make_case(100, 16, 8, 8, 2)
    d, g = layer(x, strategy="dense").stats, layer(x, strategy="grouped").stats
    assert d.computed_rows == 800 and g.computed_rows == 200
    assert d.computed_rows / g.computed_rows == 8 / 2
    assert d.wasted_fraction == pytest.approx(0.75) and g.wasted_fraction == 0


def test_padded_counts_padding():
    layer, x = make_case(30, 16, 8, 3, 1)
    r = hand_routing([[0]] * 20 + [[1]] * 7 + [[2]] * 3)
    s = layer(x, strategy="padded", routing=r).stats
    assert s.computed_rows == 3 * 20 and s.padded_slots == 60 - 30


# ---------------------------------------------------------------- the grouped pipeline, step by step


@given(cfg=configs(), method=st.sampled_from(["argsort", "counting"]), drop=st.booleans())
def test_grouped_steps_intermediates_and_output(cfg, method, drop):
    T, D, F, E, K, renorm, seed = cfg
    layer, x = make_case(T, D, F, E, K, seed=seed, renormalize=renorm)
    r = layer.route(x)
    if drop and T:  # some assignments dropped (-1), as capacity leaves them
        r = hand_routing(r.topk_ids.masked_fill(torch.arange(T * K).view(T, K) % 3 == 0, -1), r.topk_weights)
    s = grouped_steps(x, r, layer.w13, layer.w2, method=method)
    kept = r.topk_ids[r.topk_ids >= 0]
    assert s.plan.counts.tolist() == torch.bincount(kept, minlength=E).tolist()
    assert torch.equal(s.xs, x[s.plan.token_ids])  # permute is a gather of token rows
    blocks = list(expert_blocks(s.plan))
    assert [e for e, _ in blocks] == [e for e in range(E) if s.plan.counts[e] > 0]
    assert [(b.start, b.stop) for _, b in blocks] == [(int(s.plan.offsets[e]), int(s.plan.offsets[e + 1]))
                                                      for e, _ in blocks]
    for e, rows in blocks:  # each block went through its own expert
        assert torch.equal(s.ys[rows], moe_ref.expert_ffn(s.xs[rows], layer.w13[e], layer.w2[e]))
    assert torch.equal(s.y, moe_ref.unpermute(s.ys, s.plan, r.topk_weights))  # then the weighted combine
    assert_close(s.y, moe_ref.reference_moe(x, r, layer.w13, layer.w2))
    strategy = moe_ref.strategy.get_strategy("grouped")  # the registered function (ids -1 allowed)
    assert torch.equal(s.y, strategy(x, r, layer.w13, layer.w2).y)  # the strategy is these steps, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E, T", [(8, 40), (64, 3)])  # most experts with work; few (the one-slice-each path)
def test_ffn_rows_staged_and_per_expert_give_the_same_bits(monkeypatch, dtype, E, T):
    layer, x = make_case(T, 32, 24, E, 2, seed=4, dtype=dtype)
    r = layer.route(x)
    calls = []
    real = grouped.expert_ffn_into
    monkeypatch.setattr(grouped, "expert_ffn_into", lambda *a: calls.append(a[0]) or real(*a))
    staged = grouped_steps(x, r, layer.w13, layer.w2)  # small: one SwiGLU over all rows
    assert calls == []
    monkeypatch.setattr(grouped, "STAGED_BYTES", 0)  # every batch through expert_ffn_into, one expert at a time
    monkeypatch.setattr(grouped, "STAGED_BYTES_PER_EXPERT", 0)
    per_expert = grouped_steps(x, r, layer.w13, layer.w2)
    assert calls == [e for e, _ in expert_blocks(staged.plan)]
    assert torch.equal(staged.ys, per_expert.ys) and torch.equal(staged.y, per_expert.y)
    for e, rows in expert_blocks(staged.plan):
        assert torch.equal(staged.ys[rows], moe_ref.expert_ffn(staged.xs[rows], layer.w13[e], layer.w2[e]))
    y = moe_ref.strategy.get_strategy("grouped")(x, r, layer.w13, layer.w2).y  # in place over xs
    assert torch.equal(y, per_expert.y)


def test_many_experts_with_rows_stage_larger_batches(monkeypatch):
    """Gate/up rows [N, 2F] past STAGED_BYTES still go through one SwiGLU while they are within
    STAGED_BYTES_PER_EXPERT per expert with rows; past both, one expert at a time. The same bits either way."""
    layer, x = make_case(40, 32, 24, 8, 2, seed=4, dtype=torch.float32)
    r = layer.route(x)
    active = len(set(r.topk_ids.flatten().tolist()))
    h_bytes = 40 * 2 * 2 * 24 * 4  # [N, 2F] float32, N = T * K
    calls = []
    real = grouped.expert_ffn_into
    monkeypatch.setattr(grouped, "expert_ffn_into", lambda *a: calls.append(a[0]) or real(*a))
    monkeypatch.setattr(grouped, "STAGED_BYTES", h_bytes - 1)
    ys = {}
    for per_expert, staged in ((-(-h_bytes // active), True), (h_bytes // active - 1, False)):
        monkeypatch.setattr(grouped, "STAGED_BYTES_PER_EXPERT", per_expert)
        calls.clear()
        ys[staged] = grouped_steps(x, r, layer.w13, layer.w2).ys
        assert len(calls) == (0 if staged else active), (per_expert, staged)
    assert torch.equal(ys[True], ys[False])


@pytest.mark.skipif(cpu_gemm.grouped_mm_fn() is None, reason="this torch has no grouped GEMM")
def test_the_cpp_loop_returns_its_own_tensor_and_leaves_out_alone(monkeypatch):
    layer, x = make_case(40, 32, 24, 4, 2, seed=2, dtype=torch.float32)
    r = layer.route(x)
    plan = moe_ref.group_by_expert(r.topk_ids, 4)
    xs, bounds = moe_ref.permute(x, plan), plan.offsets.tolist()
    calls = []
    real = grouped.torch_grouped_gemms
    monkeypatch.setattr(grouped, "torch_grouped_gemms", lambda *a: calls.append(1) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # every GEMM a plain torch.mm: the C++ loop applies
    try:
        out = torch.full_like(xs, float("nan"))
        ys = grouped.ffn_rows(xs, bounds, layer.w13, layer.w2, out)
        assert calls == [1] and ys is not out and bool(out.isnan().all())
        monkeypatch.setattr(grouped, "CPP_LOOP", False)
        assert grouped.ffn_rows(xs, bounds, layer.w13, layer.w2, out) is out
        assert torch.equal(out, ys)
        assert torch.equal(grouped.ffn_rows(xs, bounds, layer.w13, layer.w2), ys)  # out=None: a new buffer
    finally:
        torch.set_num_threads(before)


def test_column_chunks_only_for_float32_on_threads_and_few_rows(two_threads):
    x, w = torch.randn(5, 64), torch.randn(3, 256, 64)  # rows [n, K], expert weights [E, N, K]
    out = torch.empty(5, 256)
    assert cpu_gemm.column_chunks(x, w, out) == 4  # <= 4 x 2 threads chunks of >= 64 columns: 256 / 4
    assert cpu_gemm.column_chunks(x, torch.randn(3, 1024, 64)) == 8  # at most 4 x threads
    assert cpu_gemm.column_chunks(x, torch.randn(3, 100, 64)) == 1  # 2 chunks of 50: too narrow
    assert cpu_gemm.column_chunks(x.bfloat16(), w.bfloat16()) == 1  # oneDNN shares these among threads itself
    assert cpu_gemm.column_chunks(x.double(), w.double()) == 1
    assert cpu_gemm.column_chunks(x, w.transpose(1, 2).contiguous().transpose(1, 2)) == 1  # w not row-major
    assert cpu_gemm.column_chunks(x, w, torch.empty(256, 5).t()) == 1  # out not contiguous
    assert [cpu_gemm.chunks_for(n, 4) for n in (1, cpu_gemm.SPLIT_ROWS, cpu_gemm.SPLIT_ROWS + 1)] == [4, 4, 1]
    torch.set_num_threads(1)
    assert cpu_gemm.column_chunks(x, w, out) == 1  # one thread: nothing to share


def test_expert_mm_split_is_one_bmm_equal_to_the_product(two_threads, monkeypatch):
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(7, 96, generator=g), torch.randn(384, 96, generator=g)
    out = torch.full((7, 384), float("nan"))
    calls = []
    real = torch.bmm
    def spy(x, y, **kw):
        calls.append((tuple(x.shape), tuple(y.shape)))
        return real(x, y, **kw)

    monkeypatch.setattr(torch, "bmm", spy)
    chunks = cpu_gemm.column_chunks(a, w[None])
    assert chunks == 4  # 4 chunks of 96 columns (8 of 48: too narrow)
    got = cpu_gemm.expert_mm(a, w.t(), out, chunks)
    assert got is out and calls == [((4, 7, 96), (4, 96, 96))]  # one bmm, the weight a view
    torch.testing.assert_close(out.double(), a.double() @ w.double().t(), rtol=1e-5, atol=1e-4)


def test_split_pays_is_measured_once_per_thread_count(two_threads, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_SPLIT_PAYS", {})
    monkeypatch.setattr(cpu_gemm, "PROBE_SHAPE", (3, 256, 64))
    seen = []

    def measure(winner):
        def m(fns, rounds):
            seen.append(sorted(fns))
            return {k: 1.0 if k == winner else 2.0 for k in fns}
        return m

    assert cpu_gemm.split_pays(measure("split")) is True and seen == [["mm", "split"]] * 2  # at both PROBE_ROWS
    assert cpu_gemm.split_pays() is True and len(seen) == 2  # cached for 2 threads
    assert cpu_gemm.split_pays(measure("mm")) is False
    torch.set_num_threads(1)  # nothing to split: the probe times torch.mm alone and says no
    assert cpu_gemm.split_pays(measure("mm")) is False and seen[-1] == ["mm"]
    monkeypatch.setattr(cpu_gemm, "SPLIT_PAYS", True)
    assert cpu_gemm.split_pays() is True


@pytest.mark.parametrize("pays", [True, False])
def test_the_plain_path_splits_only_where_the_split_pays(two_threads, monkeypatch, pays):
    layer, x = make_case(6, 64, 128, 4, 2, seed=3, dtype=torch.float32)
    r = layer.route(x)
    monkeypatch.setattr(cpu_gemm, "SPLIT_PAYS", pays)
    monkeypatch.setattr(grouped, "CPP_LOOP", False)  # count the Python loop's GEMMs
    bmm = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: bmm.append(1) or real(*a, **k))
    y = moe_ref.strategy.get_strategy("grouped")(x, r, layer.w13, layer.w2).y
    assert bool(bmm) == pays  # w13 [4, 256, 64] in 4 column chunks (w2 has too few columns to split)
    assert_close(y, moe_ref.reference_moe(x.double(), r, layer.w13.double(), layer.w2.double()), torch.float32)


@given(cfg=configs(), staged=st.booleans())
def test_grouped_with_split_gemms_matches_reference(cfg, staged):
    T, D, F, E, K, renorm, seed = cfg
    layer, x = make_case(T, D, F, E, K, seed=seed, renormalize=renorm)
    low = moe_ref.MoELayer(layer.cfg, dtype=torch.float32)
    low.load_state_dict(layer.state_dict())
    r = layer.route(x)
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_gemm, "SPLIT_MIN_COLS", 1)  # split even these small GEMMs
        mp.setattr(cpu_gemm, "SPLIT_PAYS", True)  # ... whatever this machine's BLAS prefers
        if not staged:
            mp.setattr(grouped, "STAGED_BYTES", 0)
            mp.setattr(grouped, "STAGED_BYTES_PER_EXPERT", 0)
        torch.set_num_threads(2)
        try:
            s = grouped_steps(x.float(), r, low.w13, low.w2)
            y = moe_ref.strategy.get_strategy("grouped")(x.float(), r, low.w13, low.w2).y
        finally:
            torch.set_num_threads(before)
    assert_close(s.y, moe_ref.reference_moe(x, r, layer.w13, layer.w2), torch.float32)
    assert torch.equal(y, s.y)  # the strategy is these steps, bit for bit, split or not


def test_grouped_strategy_runs_the_one_expert_loop(monkeypatch):
    layer, x = make_case(40, 16, 8, 6, 2, seed=1)
    r = hand_routing(torch.stack([torch.zeros(40, dtype=torch.long), torch.full((40,), 3)], 1))  # experts 0, 3
    seen = []
    real = torch.mm
    ptrs = {**{layer.w13[e].data_ptr(): ("up", e) for e in range(6)},
            **{layer.w2[e].data_ptr(): ("down", e) for e in range(6)}}

    def spy(a, b, **kw):
        if b.data_ptr() in ptrs:
            seen.append((*ptrs[b.data_ptr()], a.shape[0]))
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "mm", spy)
    y = layer(x, strategy="grouped", routing=r).output
    monkeypatch.undo()
    # one GEMM pair per expert with rows, each on its whole block; nothing for the others
    assert sorted(seen) == [("down", 0, 40), ("down", 3, 40), ("up", 0, 40), ("up", 3, 40)]
    assert_close(y, moe_ref.reference_moe(x, r, layer.w13, layer.w2))


def test_grouped_steps_bad_input():
    layer, x = make_case(5, 16, 8, 4, 2)
    r = layer.route(x)
    with pytest.raises(ValueError, match="x must be"):
        grouped_steps(x[:, :8], r, layer.w13, layer.w2)
    with pytest.raises(ValueError, match="routing has 5 tokens"):
        grouped_steps(x[:3], r, layer.w13, layer.w2)
    with pytest.raises(TypeError, match="routing must be"):
        grouped_steps(x, r.topk_ids, layer.w13, layer.w2)
    with pytest.raises(TypeError, match="dtype"):
        grouped_steps(x.float(), r, layer.w13, layer.w2)
    with pytest.raises(ValueError, match="method"):
        grouped_steps(x, r, layer.w13, layer.w2, method="bubble")


def test_unpermute_weights_and_sums_each_tokens_kept_rows():
    from moe_ref.permute import unpermute

    ids = torch.tensor([[0, 1], [1, -1], [-1, -1]])  # token 2 dropped entirely
    plan = moe_ref.group_by_expert(ids, 2)
    ys = torch.arange(9.0).view(3, 3)  # grouped rows: (t0, e0), (t0, e1), (t1, e1)
    w = torch.tensor([[0.5, 2.0], [3.0, 7.0], [11.0, 13.0]])
    y = unpermute(ys, plan, w)
    assert torch.equal(y, torch.stack([0.5 * ys[0] + 2.0 * ys[1], 3.0 * ys[2], torch.zeros(3)]))
    with pytest.raises(ValueError, match=r"ys must be \[N, D\] with N=3"):
        unpermute(torch.zeros(4, 3), plan, w)
    with pytest.raises(ValueError, match=r"topk_weights must be \[T, K\] = \[3, 2\]"):
        unpermute(ys, plan, w[:2])
    full = moe_ref.group_by_expert(torch.tensor([[1], [0]]), 2)  # K = 1, nothing dropped
    assert torch.equal(unpermute(torch.tensor([[5.0], [7.0]]), full, torch.ones(2, 1)), torch.tensor([[7.0], [5.0]]))
    none = moe_ref.group_by_expert(torch.full((2, 2), -1), 3)  # every slot dropped: N = 0
    assert torch.equal(unpermute(torch.zeros(0, 3), none, torch.ones(2, 2)), torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpermute_accumulates_in_float32(dtype):
    """K rows summed in float32 and rounded once: what a float32 sum of the same products gives."""
    g = torch.Generator().manual_seed(0)
    T, K, D = 64, 8, 16
    ids = torch.randint(0, 4, (T, K), generator=g)
    plan = moe_ref.group_by_expert(ids, 4)
    ys = (torch.randn(T * K, D, generator=g) * 100).to(dtype)
    w = torch.rand(T, K, generator=g).to(dtype)
    want = (ys.float()[plan.inverse].view(T, K, D) * w.float()[..., None]).sum(1)  # [T, D]
    got = moe_ref.unpermute(ys, plan, w)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=0)  # one rounding, not K


@pytest.mark.parametrize("strategy", ["grouped", "grouped_mm"])
def test_grouped_strategies_run_under_autograd(strategy):
    """Weights that require grad (a transformers model outside no_grad): same output, and gradients flow."""
    layer, x = make_case(20, 16, 8, 4, 2, seed=2, dtype=torch.float32)
    r = layer.route(x)
    fn = moe_ref.strategy.get_strategy(strategy)
    with torch.no_grad():
        want = fn(x, r, layer.w13, layer.w2).y
    w13 = layer.w13.detach().clone().requires_grad_(True)
    y = fn(x, r, w13, layer.w2).y
    assert y.requires_grad
    assert_close(y, want)
    y.sum().backward()
    assert w13.grad is not None and bool(w13.grad.abs().sum() > 0)


GROUPED_FN = moe_ref.strategy.get_strategy("grouped")


@given(cfg=configs(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_small_batches_loop_in_torchs_grouped_gemm_with_the_same_bits(cfg, dtype):
    """On one thread every small-batch GEMM is a plain torch.mm: ffn_rows loops over them in torch's grouped GEMM
    (where its 16-byte rule holds and at least a quarter of the experts have rows), and the result is bit for bit
    the Python loop's."""
    T, D, F, E, K, renorm, seed = cfg
    layer, x = make_case(T, D, F, E, K, seed=seed, renormalize=renorm)
    low = moe_ref.MoELayer(layer.cfg, dtype=dtype)
    low.load_state_dict(layer.state_dict())
    r, xl = layer.route(x), x.to(dtype)
    calls = []
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        real = grouped.torch_grouped_gemms
        mp.setattr(grouped, "torch_grouped_gemms", lambda *a: calls.append(1) or real(*a))
        torch.set_num_threads(1)
        try:
            y = GROUPED_FN(xl, r, low.w13, low.w2).y
            mp.setattr(grouped, "CPP_LOOP", False)
            want = GROUPED_FN(xl, r, low.w13, low.w2).y
        finally:
            torch.set_num_threads(before)
    active = len(set(r.topk_ids.flatten().tolist()))
    aligned = (D * xl.element_size()) % 16 == 0 and (F * xl.element_size()) % 16 == 0
    fits = aligned and 0 < active and 4 * active >= E  # at least a quarter of the experts with rows
    assert len(calls) == int(fits)
    assert torch.equal(y, want)


@pytest.mark.skipif(moe_ref.packing.prepack_unsupported(torch.empty(1, 1, 1)) is not None, reason="no packed GEMMs")
def test_the_cpp_loop_runs_only_where_most_blocks_are_a_plain_mm():
    layer, x = make_case(12, 32, 16, 4, 2, seed=1, dtype=torch.float32)
    r = layer.route(x)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = grouped.torch_grouped_gemms
        mp.setattr(grouped, "torch_grouped_gemms", lambda *a: calls.append(1) or real(*a))
        for winner, used in (("mm", True), ("packed", False)):
            moe_ref.prepack(layer.w13, layer.w2, measure=lambda fns, rounds, w=winner: {
                k: 1.0 if k == w else 2.0 for k in fns})
            calls.clear()
            y = GROUPED_FN(x, r, layer.w13, layer.w2).y
            assert calls == ([1] if used else []), winner
            assert_close(y, moe_ref.reference_moe(x.double(), r, layer.w13.double(), layer.w2.double()), torch.float32)
        sizes = [n for n in torch.bincount(r.topk_ids.flatten(), minlength=4).tolist() if n]
        cut = sorted(sizes)[len(sizes) // 2]  # mm below the median block, packed from it: half of the blocks mm
        seen = []
        for limit in (cut, min(sizes)):  # ... or none of them
            moe_ref.prepack(layer.w13, layer.w2, measure=lambda fns, rounds, lim=limit: {"batched": 2.0} if (
                "mm" not in fns) else {k: 1.0 if k == ("mm" if fns["mm"]()[0].shape[0] < lim else "packed") else 2.0
                                       for k in fns})  # the bmm, timed on its own, never wins
            c = moe_ref.packing.packed_for(layer.w13).choice
            calls.clear()
            y = GROUPED_FN(x, r, layer.w13, layer.w2).y
            assert calls == ([1] if c.mostly_mm(sizes) else []), (limit, sizes, c.methods)
            seen.append(bool(calls))
            assert_close(y, moe_ref.reference_moe(x.double(), r, layer.w13.double(), layer.w2.double()), torch.float32)
        assert seen == [True, False]
        moe_ref.prepack(layer.w13, layer.w2, tune=False)  # packed everywhere, by request: never the loop
        calls.clear()
        GROUPED_FN(x, r, layer.w13, layer.w2)
        assert calls == []
    layer.unpack()
