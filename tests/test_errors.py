"""Bad input gets a clear error naming the argument and the shapes."""

import pytest
import torch

import moe_ref
from helpers import hand_routing, make_case


@pytest.fixture
def case():
    return make_case(6, 16, 8, 4, 2, dtype=torch.float32)


def test_wrong_d(case):
    layer, x = case
    with pytest.raises(ValueError, match=r"D=16.*\(6, 15\)"):
        layer(x[:, :15])


@pytest.mark.parametrize("k", [0, -1, 5])
def test_bad_top_k(k):
    with pytest.raises(ValueError, match="top_k"):
        moe_ref.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=k)
    with pytest.raises(ValueError, match="top_k"):
        moe_ref.route(torch.randn(3, 8), torch.randn(4, 8), top_k=k)


def test_bad_config_types():
    with pytest.raises(TypeError, match="d_model"):
        moe_ref.MoEConfig(d_model=8.0, d_ff=8, num_experts=4, top_k=1)
    with pytest.raises(ValueError, match="scoring"):
        moe_ref.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1, scoring="relu")


def test_integer_x(case):
    layer, x = case
    with pytest.raises(TypeError, match="floating"):
        layer(x.long())


def test_dtype_mismatch(case):
    layer, x = case
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double())
    with pytest.raises(TypeError, match="dtype"):
        moe_ref.reference_moe(x.double(), layer.route(x), layer.w13, layer.w2)


def test_device_mismatch(case):
    layer, x = case
    with pytest.raises(ValueError, match="meta"):
        layer(x.to("meta"))


def test_nan_router_logits(case):
    layer, x = case
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite.*token: 2"):
        layer(x)


def test_hand_routing_out_of_range(case):
    layer, x = case
    with pytest.raises(ValueError, match=r"out of range.*num_experts=4"):
        layer(x, routing=hand_routing([[0, 4]] * 6))
    with pytest.raises(ValueError, match="out of range"):
        layer(x, routing=hand_routing([[0, -1]] * 6))
    with pytest.raises(ValueError, match="twice"):
        layer(x, routing=hand_routing([[1, 1]] * 6))
    with pytest.raises(ValueError, match="5 tokens"):
        layer(x, routing=hand_routing([[0, 1]] * 5))
    with pytest.raises(ValueError, match=r"\(6, 2\) and \(6, 3\)"):
        moe_ref.Routing(topk_ids=torch.zeros(6, 2, dtype=torch.long), topk_weights=torch.zeros(6, 3))
    with pytest.raises(TypeError, match="integer"):
        moe_ref.Routing(topk_ids=torch.zeros(6, 2), topk_weights=torch.zeros(6, 2))


def test_unknown_strategy(case):
    layer, x = case
    with pytest.raises(ValueError, match=r"unknown strategy 'fast'.*grouped"):
        layer(x, strategy="fast")


def test_bad_capacity_arguments(case):
    layer, x = case
    with pytest.raises(TypeError, match="CapacityConfig"):
        layer(x, capacity=1.25)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe_ref.CapacityConfig(capacity_factor=0)
    with pytest.raises(ValueError, match="drop_policy"):
        moe_ref.CapacityConfig(drop_policy="random")
    with pytest.raises(ValueError, match="overflow"):
        moe_ref.CapacityConfig(overflow="ignore")


def test_grouped_mm_float64_is_a_clear_error():
    layer, x = make_case(4, 8, 8, 2, 1)
    with pytest.raises(TypeError, match="float64"):
        layer(x, strategy="grouped_mm")
