"""MoELayer.from_weights and the seeded init: given tensors are held without a copy, bad ones are refused.

Legend: D d_model, F d_ff, E experts, K top-k.
"""

import pytest
import torch

import moe_ref
from moe_ref.layer import init_weights
from moe_ref.validate import check_choice, check_instance, check_int, check_number

CFG = moe_ref.MoEConfig(d_model=8, d_ff=6, num_experts=4, top_k=2)


def _weights(dtype=torch.float32):
    w = init_weights(CFG, seed=3)
    return w["router_weight"].to(dtype), w["w13"].to(dtype), w["w2"].to(dtype)


def test_from_weights_holds_the_tensors_without_a_copy():
    r, w13, w2 = _weights()
    layer = moe_ref.MoELayer.from_weights(CFG, r, w13, w2)
    for p, w in ((layer.router_weight, r), (layer.w13, w13), (layer.w2, w2)):
        assert p.data_ptr() == w.data_ptr() and not p.requires_grad
    x = torch.randn(5, 8, dtype=torch.float64)
    ref = moe_ref.reference_moe(x, layer.to(torch.float64).route(x), w13.double(), w2.double())
    out = moe_ref.MoELayer.from_weights(CFG, r.double(), w13.double(), w2.double())(x)
    torch.testing.assert_close(out.output, ref)


def test_from_weights_converts_only_when_asked():
    r, w13, w2 = _weights()
    layer = moe_ref.MoELayer.from_weights(CFG, r, w13, w2, dtype=torch.bfloat16)
    assert layer.w13.dtype == torch.bfloat16 and layer.w13.data_ptr() != w13.data_ptr()
    torch.testing.assert_close(layer.w13.float(), w13, rtol=1e-2, atol=1e-2)
    same = moe_ref.MoELayer.from_weights(CFG, r, w13, w2, dtype=torch.float32, device="cpu")
    assert same.w13.data_ptr() == w13.data_ptr()  # already that dtype and device: no copy


def test_seeded_init_is_the_same_layer_whatever_the_dtype():
    a = moe_ref.MoELayer(CFG, dtype=torch.float32, seed=7)
    b = moe_ref.MoELayer(CFG, dtype=torch.float64, seed=7)
    c = moe_ref.MoELayer(CFG, dtype=torch.float32, seed=8)
    torch.testing.assert_close(a.w13, b.w13.float())
    assert not torch.equal(a.w13, c.w13)
    # scaled normal: w13 ~ N(0, 1/D), w2 ~ N(0, 1/F)
    big = moe_ref.MoELayer(moe_ref.MoEConfig(d_model=256, d_ff=128, num_experts=4, top_k=1))
    assert abs(big.w13.std().item() - 256**-0.5) < 0.05 * 256**-0.5
    assert abs(big.w2.std().item() - 128**-0.5) < 0.05 * 128**-0.5


def test_init_on_the_meta_device_allocates_nothing():
    layer = moe_ref.MoELayer(moe_ref.MoEConfig(d_model=7168, d_ff=2048, num_experts=256, top_k=8),
                             dtype=torch.bfloat16, device="meta")
    assert layer.w13.is_meta and layer.w13.shape == (256, 4096, 7168) and layer.w13.dtype == torch.bfloat16


@pytest.mark.parametrize("which, bad, err, match", [
    (1, torch.zeros(4, 12, 9), ValueError, r"w13 must be \[4, 12, 8\]"),
    (2, torch.zeros(4, 6, 8), ValueError, r"w2 must be \[4, 8, 6\]"),
    (0, torch.zeros(3, 8), ValueError, r"router_weight must be \[4, 8\]"),
    (1, torch.zeros(4, 12, 8, dtype=torch.int32), TypeError, "w13.dtype must be a floating"),
    (2, "w2", TypeError, "w2 must be a torch.Tensor"),
    (2, torch.zeros(4, 8, 6, dtype=torch.float64), TypeError, "share one dtype"),
])
def test_from_weights_errors(which, bad, err, match):
    ws = list(_weights())
    ws[which] = bad
    with pytest.raises(err, match=match):
        moe_ref.MoELayer.from_weights(CFG, *ws)


def test_layer_errors():
    with pytest.raises(TypeError, match="cfg must be a moe_ref.MoEConfig"):
        moe_ref.MoELayer({"d_model": 8})
    with pytest.raises(TypeError, match="dtype must be a floating"):
        moe_ref.MoELayer(CFG, dtype=torch.int64)
    layer = moe_ref.MoELayer(CFG)
    with pytest.raises(TypeError, match="capacity must be a moe_ref.CapacityConfig or None"):
        layer(torch.randn(2, 8), capacity=1.25)


def test_validate_helpers():
    assert check_int("n", 3, 1, 5) == 3
    for bad, err in ((True, TypeError), (2.0, TypeError), (0, ValueError), (6, ValueError)):
        with pytest.raises(err, match="^n must be"):
            check_int("n", bad, 1, 5)
    assert check_number("f", 0.5, 0, strict=True) == 0.5
    for bad, err in ((0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), (False, TypeError),
                     ("1", TypeError)):
        with pytest.raises(err, match="^f must be"):
            check_number("f", bad, 0, strict=True)
    assert check_number("f", float("inf"), 0, finite=False) == float("inf")
    with pytest.raises(ValueError, match=r"^p must be one of \('a', 'b'\), got 'c'"):
        check_choice("p", "c", ("a", "b"))
    assert check_instance("c", None, moe_ref.CapacityConfig, allow_none=True) is None
    with pytest.raises(TypeError, match="^c must be a moe_ref.CapacityConfig, got int"):
        check_instance("c", 1, moe_ref.CapacityConfig)
