"""Packed expert weights (moe_ref.packing): the grouped strategy on them equals the reference; stale copies go."""

import gc
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moe_ref
from helpers import assert_close, configs, make_case
from moe_ref import grouped, packing
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
    low = low_copy(layer, dtype).prepack()
    r = layer.route(x)
    with pytest.MonkeyPatch.context() as mp:
        if not staged:
            mp.setattr(grouped, "STAGED_BYTES", 0)  # every batch through expert_ffn_into
        s = grouped_steps(x.to(dtype), r, low.w13, low.w2)
        y = GROUPED(x.to(dtype), r, low.w13, low.w2).y
        out = low(x.to(dtype), routing=r)
    want = moe_ref.reference_moe(x, r, layer.w13, layer.w2)
    assert_close(s.y, want, dtype, msg=f"packed T={T} D={D} F={F} E={E} K={K} {dtype}")
    assert torch.equal(y, s.y) and torch.equal(out.output, s.y)  # the strategy is these steps, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E, T", [(8, 40), (64, 3)])  # most experts with work; few
def test_packed_gemms_run_every_expert_with_work_and_equal_the_plain_ones(packed_calls, dtype, E, T):
    layer, x = make_case(T, 32, 24, E, 2, seed=4, dtype=dtype)
    r = layer.route(x)
    plain = grouped_steps(x, r, layer.w13, layer.w2)
    assert packed_calls == []  # not packed: torch.mm
    layer.prepack()
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
    layer.prepack()
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
    layer.prepack()
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
    moe_ref.prepack(w13, layer.w2)
    y = GROUPED(x, r, w13, layer.w2).y
    y.sum().backward()
    assert w13.grad is not None and w13.grad.abs().sum() > 0
    assert packed_calls == []  # under autograd no packed (no backward) GEMM


def test_expert_gemms_choose_packed_or_plain():
    x, w = torch.randn(3, 16), torch.randn(4, 24, 16)
    assert ExpertGemms(x, w, [0, 1]).packed is None
    moe_ref.prepack(w)
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
