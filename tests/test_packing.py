"""Packed expert weights (moe_ref.packing): the grouped strategy on them equals the reference; stale copies go."""

import gc
import warnings

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import moe_ref
from helpers import assert_close, configs, make_case
from moe_ref import cpu_gemm, grouped, packing
from moe_ref.cpu_gemm import GemmChoice
from moe_ref.grouped import ExpertGemms, grouped_steps

pytestmark = pytest.mark.skipif(packing.prepack_unsupported(torch.empty(1, 1, 1)) is not None,
                                reason=f"no packed GEMMs here: {packing.prepack_unsupported(torch.empty(1, 1, 1))}")
GROUPED = moe_ref.strategy.get_strategy("grouped")


def low_copy(layer, dtype):
    """A layer with layer's weights in dtype (the float64 case's weights, rounded), its own tensors."""
    low = moe_ref.MoELayer(layer.cfg, dtype=dtype)
    low.load_state_dict(layer.state_dict())
    return low


@pytest.fixture
def packed_calls(monkeypatch):
    """The experts each PackedWeight.mm was asked for, in order (the real product is still computed)."""
    calls = []
    real = packing.PackedWeight.mm

    def spy(self, e, a, out):
        calls.append((self.shape, e, a.shape[0]))
        return real(self, e, a, out)

    monkeypatch.setattr(packing.PackedWeight, "mm", spy)
    return calls


@given(cfg=configs(), staged=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_grouped_on_packed_weights_matches_reference(cfg, staged, dtype):
    T, D, F, E, K, renorm, seed = cfg
    layer, x = make_case(T, D, F, E, K, seed=seed, renormalize=renorm)
    low = low_copy(layer, dtype).prepack(tune=False)
    r = layer.route(x)
    with pytest.MonkeyPatch.context() as mp:
        if not staged:
            mp.setattr(grouped, "STAGED_BYTES", 0)  # every batch through expert_ffn_into
            mp.setattr(grouped, "STAGED_BYTES_PER_EXPERT", 0)
        s = grouped_steps(x.to(dtype), r, low.w13, low.w2)
        y = GROUPED(x.to(dtype), r, low.w13, low.w2).y
        out = low(x.to(dtype), routing=r)
    want = moe_ref.reference_moe(x.to(dtype).double(), r, low.w13.double(), low.w2.double())  # on the rounded inputs
    assert_close(s.y, want, dtype, msg=f"packed T={T} D={D} F={F} E={E} K={K} {dtype}")
    assert torch.equal(y, s.y) and torch.equal(out.output, s.y)  # the strategy is these steps, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E, T", [(8, 40), (64, 3)])  # most experts with work; few
def test_packed_gemms_run_every_expert_with_work_and_equal_the_plain_ones(packed_calls, dtype, E, T):
    layer, x = make_case(T, 32, 24, E, 2, seed=4, dtype=dtype)
    r = layer.route(x)
    plain = grouped_steps(x, r, layer.w13, layer.w2)
    assert packed_calls == []  # not packed: torch.mm
    layer.prepack(tune=False)
    assert layer.prepacked
    s = grouped_steps(x, r, layer.w13, layer.w2)
    active = [e for e, _ in grouped.expert_blocks(s.plan)]
    counts = s.plan.counts.tolist()
    assert packed_calls == ([(tuple(layer.w13.shape), e, counts[e]) for e in active]
                            + [(tuple(layer.w2.shape), e, counts[e]) for e in active])  # up GEMMs, then down
    assert_close(s.ys, plain.ys, dtype)  # the same products, summed in another order
    layer.unpack()
    assert not layer.prepacked
    packed_calls.clear()
    assert torch.equal(grouped_steps(x, r, layer.w13, layer.w2).y, plain.y) and packed_calls == []


def test_a_change_in_place_makes_the_packed_copy_stale(packed_calls):
    layer, x = make_case(9, 16, 8, 4, 2, seed=2, dtype=torch.float32)
    r = layer.route(x)
    layer.prepack(tune=False)
    with torch.no_grad():
        layer.w13.mul_(2)  # through the tensor: its version counter moves
    want = moe_ref.reference_moe(x.double(), r, layer.w13.double(), layer.w2.double())
    with pytest.warns(RuntimeWarning, match="changed since it was prepacked"):
        y = GROUPED(x, r, layer.w13, layer.w2).y
    assert_close(y, want, torch.float32)  # the new values, on the plain weight
    assert [c[0] for c in packed_calls] == [tuple(layer.w2.shape)] * len(set(r.topk_ids.flatten().tolist()))
    assert not layer.prepacked  # w13's copy was dropped, once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GROUPED(x, r, layer.w13, layer.w2)  # no second warning
    layer.load_state_dict(low_copy(layer, torch.float32).state_dict())  # load_state_dict: copy_ under no_grad
    assert packing.packed_for(layer.w13) is None
    layer.prepack()
    assert layer.prepacked


def test_a_change_through_data_is_not_seen_until_prepack_again():
    layer, x = make_case(9, 16, 8, 4, 2, seed=2, dtype=torch.float32)
    r = layer.route(x)
    layer.prepack(tune=False)  # the packed copy answers every GEMM
    before = GROUPED(x, r, layer.w13, layer.w2).y
    layer.w13.data.mul_(2)  # .data bypasses the version counter: documented, the copy still answers
    assert layer.prepacked and torch.equal(GROUPED(x, r, layer.w13, layer.w2).y, before)
    layer.prepack()  # packs the new values
    want = moe_ref.reference_moe(x.double(), r, layer.w13.double(), layer.w2.double())
    assert_close(GROUPED(x, r, layer.w13, layer.w2).y, want, torch.float32)


def test_a_new_tensor_is_not_packed_and_a_freed_one_leaves_no_entry():
    layer, _ = make_case(3, 16, 8, 4, 2, dtype=torch.float32)
    layer.prepack()
    assert packing.packed_for(layer.w13.detach()) is None  # another tensor (same storage): not packed
    with pytest.warns(RuntimeWarning, match="changed since"):
        assert not layer.to(torch.bfloat16).prepacked  # new weights (Module.to swaps .data): pack them again
    n = len(packing._PACKS)
    w = torch.randn(2, 8, 4)
    moe_ref.prepack(w)
    assert len(packing._PACKS) == n + 1
    del w
    gc.collect()
    assert len(packing._PACKS) == n


def test_autograd_uses_the_plain_weights(packed_calls):
    layer, x = make_case(7, 16, 8, 4, 2, seed=5, dtype=torch.float32)
    r = layer.route(x)
    w13 = layer.w13.detach().clone().requires_grad_(True)
    moe_ref.prepack(w13, layer.w2, tune=False)
    y = GROUPED(x, r, w13, layer.w2).y
    y.sum().backward()
    assert w13.grad is not None and w13.grad.abs().sum() > 0
    assert packed_calls == []  # under autograd no packed (no backward) GEMM


def test_expert_gemms_choose_packed_or_plain():
    x, w = torch.randn(3, 16), torch.randn(4, 24, 16)
    assert ExpertGemms(x, w, [0, 1]).packed is None
    moe_ref.prepack(w, tune=False)
    g = ExpertGemms(x, w, [0, 1])
    out = torch.empty(3, 24)
    assert g.packed is not None and g.mm(1, x, out) is out
    torch.testing.assert_close(out, x @ w[1].t())
    moe_ref.unpack(w)
    assert ExpertGemms(x, w, [0, 1]).packed is None


@pytest.mark.parametrize("w, match", [
    (torch.randn(2, 4, 3, dtype=torch.float64), "float64"),
    (torch.randn(4, 3), r"\[E, N, K\]"),
    (torch.empty(2, 4, 3, device="meta"), "meta"),
    ("w13", "torch.Tensor"),
])
def test_prepack_refuses_what_it_cannot_pack(w, match):
    with pytest.raises(ValueError, match=match):
        moe_ref.prepack(w)


def test_prepack_refuses_inference_tensors_and_the_layer_says_why():
    with torch.inference_mode():
        w = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="inference tensor"):
        moe_ref.prepack(w)
    layer, _ = make_case(3, 16, 8, 4, 2)  # float64
    with pytest.raises(ValueError, match="weight 0 .*float64"):
        layer.prepack()
    assert not layer.prepacked


def fake_measure(pick):
    """A measure for choose_gemms that times nothing: pick(n, candidates) names the winner at n rows (n is the
    rows of the GEMM that the first call of a candidate runs), "batched" among them where choose_gemms times it
    (up to BATCHED_ROWS, in a second call of its own, which gets the answer of this pick)."""
    batched = {}

    def measure(fns, rounds):
        if list(fns) == ["batched"]:
            return {"batched": batched.pop("seconds")}
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            real = torch.mm
            mp.setattr(torch, "mm", lambda a, b, **kw: calls.append(a.shape[0]) or real(a, b, **kw))
            fns["mm"]()
        n = calls[0]
        winner = pick(n, sorted([*fns, "batched"] if n <= cpu_gemm.BATCHED_ROWS else fns))
        batched["seconds"] = 1.0 if winner == "batched" else 2.0
        return {k: (1.0 if k == winner else 2.0) for k in fns}
    return measure


def test_gemm_choice_takes_the_nearest_timed_row_count_on_a_log_scale():
    c = GemmChoice((1, 4, 16, 64), ("mm", "packed", "split", "mm"))
    assert [c.method_for(n) for n in (0, 1, 2, 3, 4, 7, 8, 9, 31, 32, 33, 10_000)] == [
        "mm", "mm", "mm", "packed", "packed", "packed", "packed", "split", "split", "split", "mm", "mm"]
    assert c.uses_packed and not GemmChoice((1,), ("mm",)).uses_packed
    with pytest.raises(ValueError, match="unknown GEMM method"):
        GemmChoice((1,), ("fast",))
    with pytest.raises(ValueError, match="increasing"):
        GemmChoice((4, 1), ("mm", "mm"))
    with pytest.raises(ValueError, match="increasing"):
        GemmChoice((1, 4), ("mm",))


@given(methods=st.lists(st.sampled_from(cpu_gemm.GEMM_METHODS), min_size=1, max_size=6),
       sizes=st.lists(st.one_of(st.just(0), st.integers(1, 40), st.integers(cpu_gemm.MM_TABLE_ROWS - 2, 10_000)),
                      max_size=70))
@example(methods=["mm", "packed"], sizes=[0, 0, 5])  # two empty blocks must not outvote one packed block
@example(methods=["packed", "mm"], sizes=[0, 9, cpu_gemm.MM_TABLE_ROWS])  # past the table
def test_mostly_mm_counts_the_blocks_with_rows_by_their_method(methods, sizes):
    c = GemmChoice(tuple(4 ** i for i in range(len(methods))), tuple(methods))
    rows = [n for n in sizes if n]  # blocks of 0 rows run nothing and are not counted
    assert c.mostly_mm(sizes) == (2 * sum(c.method_for(n) == "mm" for n in rows) >= len(rows)), (methods, sizes)


def test_choose_gemms_times_every_candidate_on_enough_experts(monkeypatch):
    w = torch.randn(6, 24, 16)
    packed = packing.PackedWeight(w, tune=False).experts
    seen = []

    def measure(fns, rounds):
        seen.append(sorted(fns))
        if "batched" in fns:  # timed on its own, over the same experts: one bmm of [6, n, K] rows
            bmm = []
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch, "bmm", lambda a, b, real=torch.bmm, **kw: bmm.append(tuple(b.shape)) or real(a, b,
                                                                                                             **kw))
                fns["batched"]()
            assert bmm == [(6, 16, 24)]
            return {"batched": 1.0}
        mm = []
        with pytest.MonkeyPatch.context() as mp:
            real = torch.mm
            mp.setattr(torch, "mm", lambda a, b, **kw: mm.append((a.data_ptr(), b.data_ptr(), kw["out"].data_ptr()))
                       or real(a, b, **kw))
            fns["mm"]()
        # one GEMM per expert, each on rows and into an output of its own: nothing of the pass is read from cache
        assert all(len({g[i] for g in mm}) == len(mm) == 6 for i in range(3)), mm
        return {k: float(i + 2) for i, k in enumerate(sorted(fns))}

    c = cpu_gemm.choose_gemms(w, packed, rows=(1, 8), measure=measure)
    assert seen == [["mm", "packed"], ["batched"]] * 2  # the bmm over the pass's experts is timed too, apart ...
    assert c.methods == ("mm", "mm")  # ... but is no method for one block, even when fastest
    assert c.seconds[0] == {"batched": 1 / 6, "mm": 2 / 6, "packed": 3 / 6}  # per GEMM: the pass over 6 experts
    assert c.batched_seconds(1, 6) == pytest.approx(1.0) and c.batched_seconds(8, 6) == pytest.approx(1.0)
    assert c.batched_seconds(4, 6) == pytest.approx(1.0)
    assert c.batched_seconds(9, 6) == pytest.approx(9 / 8)  # past the last count: proportional to the rows
    assert c.loop_seconds([0, 1, 2, 8]) == pytest.approx(3 * 2 / 6)  # three blocks, each by mm
    assert c.loop_seconds([16]) == pytest.approx(2 * 2 / 6)
    assert cpu_gemm.fixed_choice("packed").batched_seconds(4, 6) is None
    mixed = GemmChoice((1, 4, 16, 64), ("mm", "packed", "mm", "mm"))
    assert mixed.mostly_mm([1, 3, 16]) and mixed.mostly_mm([1, 4]) and not mixed.mostly_mm([1, 4, 3])
    assert cpu_gemm.choose_gemms(w, None, rows=(1,), measure=measure).methods == ("mm",)
    seen.clear()  # many rows: still a pass over every expert (the measure checks), and no bmm past BATCHED_ROWS
    assert cpu_gemm.choose_gemms(w, None, rows=(cpu_gemm.BATCHED_ROWS + 1, 200_000), measure=measure).methods == (
        "mm", "mm")
    assert seen == [["mm"]] * 2


def test_gemm_choice_costs_are_linear_in_rows_between_the_timed_counts():
    """loop_seconds and batched_seconds: linear between timed row counts, from 0 at 0 rows, proportional past the
    last; the loop's blocks each by the method chosen nearest (here packed at 4, mm at 1 and 16)."""
    c = GemmChoice((1, 4, 16), ("mm", "packed", "mm"), ({"mm": 1.0, "packed": 3.0, "batched": 0.5},
                                                         {"mm": 5.0, "packed": 4.0, "batched": 1.0},
                                                         {"mm": 10.0, "packed": 12.0}))
    assert c.loop_seconds([0]) == 0 and c.loop_seconds([1, 4, 16]) == pytest.approx(1 + 4 + 10)
    assert c.loop_seconds([2]) == pytest.approx(2.0) and c.loop_seconds([10]) == pytest.approx(7.0)
    assert c.loop_seconds([32, 0, 8]) == pytest.approx(20 + 4 + 2)
    assert c.loop_seconds([cpu_gemm.MM_TABLE_ROWS + 16]) == pytest.approx(10 * (cpu_gemm.MM_TABLE_ROWS + 16) / 16)
    assert c.batched_seconds(2, 3) == pytest.approx((0.5 + 0.5 / 3) * 3)  # between 1 and 4 rows, x 3 experts
    assert c.batched_seconds(8, 1) == pytest.approx(2.0)  # past 4, its last timed count (none at 16)
    assert GemmChoice((1, 4), ("mm", "mm"), ({"mm": 1.0}, {"mm": 2.0})).batched_seconds(2, 3) is None  # no bmm timed


def test_choose_gemms_offers_the_split_for_float32_on_two_threads(two_threads):
    w = torch.randn(2, 256, 16)
    c = cpu_gemm.time_gemms(w, None, rows=(1, cpu_gemm.SPLIT_ROWS + 1), measure=lambda fns, r: dict.fromkeys(fns, 1.0))
    assert [sorted(s) for s in c] == [["mm", "split"], ["mm"]]  # not beyond SPLIT_ROWS rows


def test_prepack_times_real_gemms_and_the_layer_reports_the_choice():
    layer, x = make_case(20, 32, 24, 4, 2, seed=1, dtype=torch.float32)
    layer.prepack()
    choices = layer.gemm_choices()
    assert set(choices) == {"w13", "w2"}
    for c in choices.values():
        assert [int(n) for n in c] == list(cpu_gemm.CHOICE_ROWS)
        for n, v in c.items():
            assert v["method"] in v["us"] and set(v["us"]) >= {"mm", "packed"}
            assert ("batched" in v["us"]) == (int(n) <= cpu_gemm.BATCHED_ROWS)
            assert all(t > 0 for t in v["us"].values())
            assert v["us"][v["method"]] == min(t for k, t in v["us"].items() if k != "batched")
    r = layer.route(x)
    assert_close(GROUPED(x, r, layer.w13, layer.w2).y, moe_ref.reference_moe(x.double(), r, layer.w13.double(),
                 layer.w2.double()), torch.float32)
    assert layer.unpack().gemm_choices() == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_small_batch_runs_as_one_padded_bmm_per_weight_where_that_was_timed_faster(dtype):
    layer, x = make_case(24, 32, 16, 6, 2, seed=5)
    low = low_copy(layer, dtype)
    r = layer.route(x)
    want = moe_ref.reference_moe(x, r, layer.w13, layer.w2)
    counts = torch.bincount(r.topk_ids.flatten(), minlength=6)
    for batched, used in ((0.01, True), (100.0, False)):
        moe_ref.prepack(low.w13, low.w2, measure=lambda fns, rounds, b=batched: {  # packed per block (no C++ loop)
            k: b if k == "batched" else 1.0 if k == "packed" else 2.0 for k in fns})
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "bmm", lambda a, b, real=torch.bmm, seen=calls, **kw: seen.append(tuple(a.shape))
                       or real(a, b, **kw))
            s = grouped_steps(x.to(dtype), r, low.w13, low.w2)
            y = GROUPED(x.to(dtype), r, low.w13, low.w2).y
        C = int(counts.max())
        assert calls == ([(6, C, 32), (6, C, 16)] * 2 if used else []), (batched, calls)  # [E, C, D], [E, C, F]
        assert_close(s.y, want, dtype, msg=f"batched={batched}")
        assert torch.equal(y, s.y)
        for e, rows in grouped.expert_blocks(s.plan):  # every block through its own expert
            assert_close(s.ys[rows], moe_ref.expert_ffn(s.xs[rows].double(), layer.w13[e], layer.w2[e]), dtype)


@given(cfg=configs(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), drop=st.floats(0.0, 1.0),
       seed=st.integers(0, 1000), chunk=st.sampled_from([None, 1, 3000]))
@example(cfg=(7, 4, 3, 1, 1, False, 0), dtype=torch.bfloat16, drop=0.0, seed=0, chunk=None)  # E=1: C = N, no padding
@example(cfg=(33, 16, 8, 8, 2, True, 3), dtype=torch.float32, drop=0.5, seed=1, chunk=1)  # dropped, one expert a chunk
@example(cfg=(64, 33, 22, 16, 16, False, 5), dtype=torch.bfloat16, drop=1.0, seed=2, chunk=None)  # K=E, all dropped
@example(cfg=(64, 16, 8, 16, 4, False, 7), dtype=torch.bfloat16, drop=0.1, seed=3, chunk=3000)  # uneven chunks
@example(cfg=(2, 33, 8, 2, 1, False, 2), dtype=torch.float32, drop=0.0, seed=0, chunk=1)  # odd D: chunk alignment
def test_grouped_batched_path_skips_the_grouped_rows_for_the_same_bits(cfg, dtype, drop, seed, chunk):
    """Where ffn_rows takes the padded bmm, the grouped strategy gathers x straight into padded rows and combines
    straight out of them (batched_moe): the same bits as the steps through xs and ys, and the reference, whatever
    the chunks of experts padded_ffn runs (chunk: PADDED_CHUNK_BYTES; None: the default)."""
    T, D, F, E, K, renorm, s = cfg
    layer, x = make_case(T, D, F, E, K, seed=s, renormalize=renorm)
    low = low_copy(layer, dtype)
    moe_ref.prepack(low.w13, low.w2, measure=lambda fns, rounds: {  # the bmm always timed fastest
        k: 0.01 if k == "batched" else 1.0 if k == "packed" else 2.0 for k in fns})
    r = layer.route(x)
    g = torch.Generator().manual_seed(seed)
    ids = torch.where(torch.rand(r.topk_ids.shape, generator=g) < drop, -1, r.topk_ids)  # some slots dropped
    r = moe_ref.Routing(topk_ids=ids, topk_weights=r.topk_weights)
    xd = x.to(dtype)
    calls, bmms = [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grouped, "batched_moe", lambda *a, real=grouped.batched_moe: calls.append(1) or real(*a))
        if chunk is not None:
            mp.setattr(grouped, "PADDED_CHUNK_BYTES", chunk)
        mp.setattr(torch, "bmm", lambda a, b, real=torch.bmm, **kw: bmms.append(a.shape[0]) or real(a, b, **kw))
        y = GROUPED(xd, r, low.w13, low.w2).y
        strategy_bmms = list(bmms)
        s = grouped_steps(xd, r, low.w13, low.w2)
        plan = s.plan
        if plan.num_rows:
            rows = grouped.padded_rows(plan.offsets.tolist(), plan.counts.tolist())
            g = grouped.padded_chunk(rows, D, F, xd.element_size())
    path = grouped.ffn_path(s.xs, plan.offsets.tolist(), low.w13, low.w2, s.xs)
    assert (calls == [1]) == (path == "batched"), (path, calls)
    if path == "batched":  # each chunk of g experts (the last one: the rest) runs its two bmm
        want_chunks = [min(g, E - e0) for e0 in range(0, E, g) for _ in (0, 1)]
        assert strategy_bmms == want_chunks and bmms == want_chunks * 2, (strategy_bmms, g)
        assert chunk != 1 or g == 1
    assert path == "batched" or plan.num_rows == 0 or T * K == 0, path  # the fake timing makes the bmm win
    assert torch.equal(y, s.y)
    want = moe_ref.reference_moe(xd.double(), r, low.w13.double(), low.w2.double())
    assert_close(y, want, dtype, msg=f"T={T} D={D} F={F} E={E} K={K} drop={drop}")


@given(cfg=configs(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000),
       staged=st.booleans())
@example(cfg=(33, 4, 8, 1, 1, False, 6721), dtype=torch.bfloat16, seed=0, staged=False)
def test_grouped_on_any_mix_of_gemm_methods_matches_reference(cfg, dtype, seed, staged):
    """Whatever the timing chose per row count (here at random), every row gets its expert's FFN."""
    T, D, F, E, K, renorm, s = cfg
    layer, x = make_case(T, D, F, E, K, seed=s, renormalize=renorm)
    low = low_copy(layer, dtype)
    rng = torch.Generator().manual_seed(seed)
    pick = lambda n, names: names[int(torch.randint(len(names), (1,), generator=rng))]  # noqa: E731
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_gemm, "SPLIT_MIN_COLS", 1)  # the split is a candidate even for these small weights
        if not staged:
            mp.setattr(grouped, "STAGED_BYTES", 0)
            mp.setattr(grouped, "STAGED_BYTES_PER_EXPERT", 0)
        torch.set_num_threads(2)
        try:
            moe_ref.prepack(low.w13, low.w2, measure=fake_measure(pick))
            r = layer.route(x)
            y = GROUPED(x.to(dtype), r, low.w13, low.w2).y
        finally:
            torch.set_num_threads(before)
    # against the float64 reference on the very inputs the methods got (x and the weights rounded to dtype): the
    # rounding of the inputs alone can move a bf16 output by more than the tolerance (T=33 D=4 F=8 E=1 K=1)
    want = moe_ref.reference_moe(x.to(dtype).double(), r, low.w13.double(), low.w2.double())
    assert_close(y, want, dtype, msg=f"T={T} D={D} F={F} E={E} K={K}")


@given(cfg=configs(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000),
       staged=st.booleans(), prepacked=st.booleans(), threads=st.sampled_from([1, 2]))
@example(cfg=(33, 16, 8, 2, 1, True, 1), dtype=torch.float32, seed=0, staged=True, prepacked=False, threads=1)  # C++
@example(cfg=(7, 16, 8, 3, 2, True, 1), dtype=torch.bfloat16, seed=0, staged=True, prepacked=True, threads=2)  # bmm
def test_ffn_path_names_the_way_ffn_rows_takes(cfg, dtype, seed, staged, prepacked, threads):
    """ffn_path (what the bench records per case) agrees with the way ffn_rows then runs, on any GEMM choice."""
    T, D, F, E, K, renorm, s = cfg
    layer, x = make_case(T, D, F, E, K, seed=s, renormalize=renorm)
    low = low_copy(layer, dtype)
    rng = torch.Generator().manual_seed(seed)
    pick = lambda n, names: names[int(torch.randint(len(names), (1,), generator=rng))]  # noqa: E731
    ways, before = [], torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for name, way in (("torch_grouped_gemms", "cpp_loop"), ("padded_gemms", "batched"),
                          ("expert_ffn_into", "per_expert")):
            real = getattr(grouped, name)
            mp.setattr(grouped, name, lambda *a, real=real, way=way: ways.append(way) or real(*a))
        mp.setattr(cpu_gemm, "SPLIT_MIN_COLS", 1)
        if not staged:
            mp.setattr(grouped, "STAGED_BYTES", 0)
            mp.setattr(grouped, "STAGED_BYTES_PER_EXPERT", 0)
        torch.set_num_threads(threads)
        try:
            if prepacked:
                moe_ref.prepack(low.w13, low.w2, measure=fake_measure(pick))
            plan = moe_ref.group_by_expert(layer.route(x).topk_ids, E)
            xs = moe_ref.permute(x.to(dtype), plan)
            bounds = plan.offsets.tolist()
            path = grouped.ffn_path(xs, bounds, low.w13, low.w2, xs)
            assert grouped.ffn_path(torch.empty_like(xs), bounds, low.w13, low.w2, xs) == path  # layout only
            grouped.ffn_rows(xs, bounds, low.w13, low.w2, xs)
        finally:
            torch.set_num_threads(before)
    ran = set(ways) or {"staged" if bounds[-1] else "empty"}
    assert ran == {path} and path in grouped.FFN_PATHS, (path, ways)


def test_ffn_path_under_autograd():
    layer, x = make_case(6, 8, 4, 3, 2, dtype=torch.float32)
    plan = moe_ref.group_by_expert(layer.route(x).topk_ids, 3)
    xs = moe_ref.permute(x.requires_grad_(), plan)  # recorded by autograd
    assert grouped.ffn_path(xs, plan.offsets.tolist(), layer.w13, layer.w2) == "autograd"
    with torch.no_grad():
        assert grouped.ffn_path(xs, plan.offsets.tolist(), layer.w13, layer.w2) != "autograd"


def test_the_chosen_method_runs_and_an_unchosen_packed_copy_is_not_kept(packed_calls):
    layer, x = make_case(40, 32, 24, 2, 1, seed=3, dtype=torch.float32)  # two experts: blocks of ~20 rows
    r = layer.route(x)
    counts = torch.bincount(r.topk_ids.flatten(), minlength=2).tolist()
    layer.prepack(tune=False)
    want = GROUPED(x, r, layer.w13, layer.w2).y
    packed_calls.clear()
    moe_ref.prepack(layer.w13, layer.w2, measure=fake_measure(lambda n, names: "packed" if n >= 16 else "mm"))
    assert packing.packed_for(layer.w13).choice.methods == tuple("packed" if n >= 16 else "mm"
                                                                 for n in cpu_gemm.CHOICE_ROWS)
    assert_close(GROUPED(x, r, layer.w13, layer.w2).y, want, torch.float32)
    assert sorted(c[2] for c in packed_calls) == sorted(counts * 2)  # blocks of >= 12 rows: packed
    moe_ref.prepack(layer.w13, layer.w2, measure=fake_measure(lambda n, names: "mm"))
    assert packing.packed_for(layer.w13).experts is None  # no second copy where it never wins
    packed_calls.clear()
    assert_close(GROUPED(x, r, layer.w13, layer.w2).y, want, torch.float32)
    assert packed_calls == []


def test_a_changed_thread_count_warns_once(two_threads):
    layer, x = make_case(5, 16, 8, 4, 2, dtype=torch.float32)
    r = layer.route(x)
    moe_ref.prepack(layer.w13, layer.w2, measure=fake_measure(lambda n, names: "mm"))
    torch.set_num_threads(1)
    with pytest.warns(RuntimeWarning, match="timed by prepack with 2 torch threads and now run with 1"):
        GROUPED(x, r, layer.w13, layer.w2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GROUPED(x, r, layer.w13, layer.w2)  # once per weight



def test_padded_chunks_are_all_experts_where_they_fit_else_a_power_of_two():
    """padded_chunk's rule, worked by hand: C * (2D + 3F) * element_size bytes per expert against
    PADDED_CHUNK_BYTES."""
    def chunk(E, C, D=512, F=256, elt=2):
        return grouped.padded_chunk(grouped.PaddedRows(E, C, torch.zeros(0, dtype=torch.long)), D, F, elt)

    per = 2 * 512 + 3 * 256  # elements per padded row
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grouped, "PADDED_CHUNK_BYTES", 15 * 166 * per * 2)  # 15 experts of 166 rows fit
        assert chunk(64, 166) == 8 and chunk(15, 166) == 15 and chunk(12, 166) == 12 and chunk(16, 166) == 8
        assert chunk(64, 15 * 166) == 1 and chunk(64, 100 * 166) == 1  # one expert, even past the budget
        assert chunk(64, 166, elt=4) == 4  # 7 fit in float32
