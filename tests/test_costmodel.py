"""moe_ref.costmodel: the closed form against simulation, known answers, real routings, errors, calibration.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, H distinct experts touched.
"""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moe_ref
from helpers import hand_routing
from moe_ref import costmodel as cm
from moe_ref.roofline import expected_hit

SHAPE = moe_ref.MoEConfig(d_model=64, d_ff=32, num_experts=8, top_k=2)
UNIT = cm.DeviceProfile("unit", bandwidth_bps=1.0, peak_flops=1.0, elem_bytes=1)


@pytest.mark.parametrize("T, E, K", [(1, 8, 2), (4, 8, 2), (16, 8, 2), (3, 64, 8), (40, 64, 8), (7, 5, 5)])
def test_closed_form_matches_simulation(T, E, K):
    sim = cm.simulated_hit(T, E, K, trials=4000, seed=1)
    closed = expected_hit(T, E, K)
    se = sim["std"] / math.sqrt(sim["trials"])
    assert abs(sim["mean"] - closed) <= 4 * se + 1e-9, (sim, closed)


def test_closed_form_is_exact_by_enumeration():
    """E=5, K=2, T=2: average the distinct experts over every pair of K-subsets, in float64."""
    subsets = list(combinations(range(5), 2))
    mean = sum(len(set(a) | set(b)) for a in subsets for b in subsets) / len(subsets) ** 2
    assert expected_hit(2, 5, 2) == pytest.approx(mean, rel=1e-12)


def test_step_cost_known_answers():
    # unit device: 1 byte/s, 1 FLOP/s, 1-byte weights: memory_s = bytes, compute_s = FLOPs
    c = cm.step_cost(SHAPE, 1, 2, UNIT)
    assert c["weight_bytes"] == 2 * 3 * 64 * 32
    assert c["flops"] == 6 * 64 * 32 * 1 * 2
    assert c["memory_s"] == c["bytes"] == c["weight_bytes"] + c["activation_bytes"]
    assert c["time_s"] == max(c["memory_s"], c["compute_s"]) == c["flops"] and c["binds"] == "compute"
    over = UNIT.replace(step_overhead_s=5.0, expert_overhead_s=2.0)
    assert cm.step_cost(SHAPE, 1, 2, over)["time_s"] == c["time_s"] + 5.0 + 2 * 2.0
    assert cm.step_cost(SHAPE, 0, 0, over)["time_s"] == 0.0
    dropped = cm.step_cost(SHAPE, 4, 3, UNIT, kept=5)
    assert dropped["flops"] == 6 * 64 * 32 * 5


def test_h200_knee_and_dense_equivalent():
    qwen = moe_ref.MoEConfig(d_model=2048, d_ff=768, num_experts=128, top_k=8)
    dense = cm.dense_equivalent(qwen)
    assert (dense.num_experts, dense.top_k, dense.d_ff) == (1, 1, 8 * 768)
    # same active parameters: one token costs the MoE and the dense model the same FLOPs
    assert cm.step_cost(qwen, 1, 8)["flops"] == cm.step_cost(dense, 1, 1)["flops"]
    # dense: 6*D*F' FLOPs per token against 3*D*F'*2 weight bytes per step, so T* = peak / bandwidth (activations
    # add a little); the MoE needs far more tokens, since it keeps touching new experts
    assert cm.knee_tokens(dense) == pytest.approx(cm.H200.peak_flops / cm.H200.bandwidth_bps, rel=0.15)
    assert cm.knee_tokens(qwen) > 10 * cm.knee_tokens(dense)
    # at T = 1, the MoE with K=8 reads 8 experts' weights: as many bytes as the dense FFN
    assert cm.expected_step_cost(qwen, 1)["weight_bytes"] == pytest.approx(cm.step_cost(dense, 1, 1)["weight_bytes"])


def test_routing_step_cost_counts_touched_and_kept():
    r = hand_routing([[0, 1], [1, 2], [-1, 5]])  # 4 experts touched, 5 kept assignments (one dropped)
    c = cm.routing_step_cost(SHAPE, r, UNIT)
    assert (c["tokens"], c["hit"], c["kept"]) == (3, 4, 5)
    assert c == cm.step_cost(SHAPE, 3, 4, UNIT, kept=5)


@given(T=st.integers(1, 64), seed=st.integers(0, 100))
def test_routing_step_cost_of_random_routing_is_bounded(T, seed):
    r = moe_ref.random_routing(T, 8, 2, seed=seed)
    c = cm.routing_step_cost(SHAPE, r)
    assert 2 <= c["hit"] <= min(8, 2 * T)
    assert c["time_s"] >= cm.step_cost(SHAPE, T, 2)["time_s"]


@pytest.mark.parametrize("call, match", [
    (lambda: cm.step_cost(SHAPE, 2, 9), "hit must be <="),
    (lambda: cm.step_cost(SHAPE, -1, 1), "num_tokens must be >= 0"),
    (lambda: cm.step_cost(SHAPE, 2, 1, kept=5), "kept must be <="),
    (lambda: cm.step_cost(SHAPE, 2, 1, "H200"), "profile must be"),
    (lambda: cm.DeviceProfile("x", 0.0, 1.0), "bandwidth_bps must be > 0"),
    (lambda: cm.routing_step_cost(SHAPE, hand_routing([[0, 1, 2]])), "K=2"),
    (lambda: cm.routing_step_cost(SHAPE, hand_routing([[0, 9]])), "ids must be < E=8"),
    (lambda: cm.routing_step_cost(SHAPE, torch.zeros(2, 2)), "routing must be"),
    (lambda: cm.simulated_hit(4, 8, 9), "top_k must be <= 8"),
    (lambda: cm.step_cost(object(), 1, 1), "shape must have"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_simulator_can_use_the_cost_model():
    kw = dict(arrival_rate=2000.0, num_requests=40, max_batch_tokens=64, max_wait=1e-3, seed=0)
    cfg = moe_ref.MoEConfig(d_model=256, d_ff=128, num_experts=8, top_k=2)
    prof = UNIT.replace(bandwidth_bps=1e9, peak_flops=1e12)
    sim = moe_ref.simulate_dynamic_batching(cfg, cost="model", profile=prof, **kw)
    for b in sim.batches:  # every batch priced by the weights of the experts its real routing touched
        hit = sum(1 for n in b["expert_counts"] if n)
        assert b["compute_s"] == cm.step_cost(cfg, b["num_tokens"], hit, prof)["time_s"]
    assert sim.params["profile"] == "unit"
    old = moe_ref.simulate_dynamic_batching(cfg, **kw)  # the linear model stays the default
    assert old.params["profile"] is None and old.batches[0]["compute_s"] != sim.batches[0]["compute_s"]


@pytest.mark.slow
def test_calibrate_and_validate_on_this_cpu():
    p = cm.calibrate_cpu(budget_ms=20, copy_bytes=1 << 24, matmul_n=256)
    assert p.name == "cpu" and p.elem_bytes == 4 and p.bandwidth_bps > 0 and p.peak_flops > 0
    assert "measured on this CPU" in p.source
    rows = cm.validate_cost_model(p, tokens=(1, 16), d_model=64, d_ff=64, budget_ms=20, progress=False)
    assert [r["tokens"] for r in rows] == [1, 16]
    for r in rows:  # no timing is asserted: only that the comparison is what it says
        assert r["measured_s"] > 0 and r["error"] == pytest.approx(r["predicted_s"] / r["measured_s"] - 1)
