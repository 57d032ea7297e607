"""Capacity, drop policies and overflow strategies: known answers and invariants.

Known-answer tests use small hand-made routings whose outcome is worked out in the comments;
hypothesis tests check the invariants on skewed routings for every torch strategy.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_ref
from helpers import assert_close, examples, hand_routing, make_case
from moe_ref.capacity import apply_capacity, expert_capacity, priority_order, priority_rank
from moe_ref.skew import skewed_routing

STRATEGIES = ["dense", "loop", "grouped", "grouped_mm", "padded"]
Cap = moe_ref.CapacityConfig


def ids_of(res):
    return res.final_ids.tolist()


def with_logits(ids, weights, logits):
    return moe_ref.Routing(torch.tensor(ids), torch.tensor(weights, dtype=torch.float32),
                           torch.tensor(logits, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# capacity formula
# ---------------------------------------------------------------------------------------------


def test_expert_capacity_formula():
    assert expert_capacity(4, 3, 2, 0.75) == 2  # ceil(4*2*0.75/3) = 2
    assert expert_capacity(10, 4, 2, 1.25) == 7  # ceil(6.25)
    assert expert_capacity(3, 1, 1, 0.1) == 1  # 0.3 rounds up to 1; float noise must not give 2
    assert expert_capacity(30, 1, 1, 0.1) == 3  # 30*0.1 = 3.0000000000000004 in floats
    assert expert_capacity(1, 8, 1, 1.0, min_capacity=4) == 4  # min_capacity wins over ceil(1/8) = 1
    assert expert_capacity(0, 8, 2, 1.0, min_capacity=0) == 0  # T=0: C=0
    assert expert_capacity(0, 8, 2, 1.0) == 1


# ---------------------------------------------------------------------------------------------
# drop policies (known answers)
# ---------------------------------------------------------------------------------------------

# T=4, K=2, E=3, capacity_factor=0.75 -> C = ceil(4*2*0.75/3) = 2
IDS = [[0, 1], [0, 2], [1, 0], [0, 1]]
W = [[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]]


def test_position_policy_known_answer():
    # expert 0 gets (t0,k0) (t1,k0) (t3,k0) (t2,k1): first choices first -> keeps t0, t1
    # expert 1 gets (t2,k0) (t0,k1) (t3,k1): keeps t2, t0; expert 2 keeps its single (t1,k1)
    r = hand_routing(IDS, W)
    res = apply_capacity(r, 3, Cap(0.75, drop_policy="position", overflow="drop"))
    assert res.capacity == 2
    assert ids_of(res) == [[0, 1], [0, 2], [1, -1], [-1, -1]]
    assert (res.dropped, res.dropped_tokens, res.rerouted) == (3, 1, 0)
    assert priority_rank(r.topk_ids, r.topk_weights, 3, "position").tolist() == [[0, 1], [1, 0], [0, 3], [2, 2]]
    assert priority_order(r.topk_weights, "position").tolist() == [0, 2, 4, 6, 1, 3, 5, 7]  # (k, t) order


def test_probability_policy_known_answer():
    # expert 0 weights t0 .6, t1 .7, t2 .5, t3 .9 -> keeps t3, t1; expert 1: t0 .4, t2 .5, t3 .1 -> keeps t2, t0
    r = hand_routing(IDS, W)
    res = apply_capacity(r, 3, Cap(0.75, drop_policy="probability", overflow="drop"))
    assert ids_of(res) == [[-1, 1], [0, 2], [1, -1], [0, -1]]
    assert (res.dropped, res.dropped_tokens) == (3, 0)
    # the kept weights are unchanged; dropped ones are zeroed in the pass routing
    torch.testing.assert_close(res.passes[0].topk_weights, torch.tensor([[0, 0.4], [0.7, 0.3], [0.5, 0], [0.9, 0]]))


def test_probability_ties_go_to_earlier_token():
    # T=4, K=1, E=2, cf=0.5 -> C=1; expert 0: t0 .5, t1 .9, t2 .9 -> t1 wins the tie with t2
    r = hand_routing([[0], [0], [0], [1]], [[0.5], [0.9], [0.9], [1.0]])
    prob = apply_capacity(r, 2, Cap(0.5, drop_policy="probability"))
    pos = apply_capacity(r, 2, Cap(0.5, drop_policy="position"))
    assert prob.capacity == 1
    assert ids_of(prob) == [[-1], [0], [-1], [1]]
    assert ids_of(pos) == [[0], [-1], [-1], [1]]  # position: earliest token


# ---------------------------------------------------------------------------------------------
# overflow strategies (known answers)
# ---------------------------------------------------------------------------------------------


def test_drop_output_is_reference_without_dropped():
    layer, x = make_case(4, 8, 6, 3, 2)
    r = hand_routing(IDS, W)
    out = layer(x, routing=r, capacity=Cap(0.75, overflow="drop"))
    kept = hand_routing([[0, 1], [0, 2], [1, -1], [-1, -1]], W)
    assert_close(out.output, moe_ref.reference_moe(x, kept, layer.w13, layer.w2))
    assert out.output[3].abs().max() == 0  # token 3 lost both assignments: zero MoE output
    s = out.stats
    assert (s.capacity, s.dropped, s.dropped_tokens, s.passes) == (2, 3, 1, 1)
    assert s.expert_counts.tolist() == [4, 3, 1]  # before capacity


# T=4, K=2, E=4, cf=1 -> C=2. Expert 0 has all four first choices: keeps t0, t1; t2 and t3 overflow.
# Room after keeping: e0 0, e1 0 (t0, t2), e2 1 (t1), e3 1 (t3).
R_IDS = [[0, 1], [0, 2], [0, 1], [0, 3]]
R_W = [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.55, 0.45]]
R_LOGITS = [[4.0, 3.0, 2.0, 1.0], [4.0, 1.0, 3.0, 2.0],
            [4.0, 3.0, 2.0, 1.0],  # t2: next after 0 is 1 (its own), then 2 (room) -> moves to 2
            [4.0, 1.0, 2.0, 3.0]]  # t3: 3 has room but t3 already uses it; 2 is full by then -> dropped


def test_reroute_known_answer():
    r = with_logits(R_IDS, R_W, R_LOGITS)
    res = apply_capacity(r, 4, Cap(1.0, overflow="reroute"))
    assert res.capacity == 2
    assert ids_of(res) == [[0, 1], [0, 2], [2, 1], [-1, 3]]
    assert (res.rerouted, res.dropped, res.dropped_tokens) == (1, 1, 0)


def test_reroute_weight_rule_keeps_original_gate_weight():
    layer, x = make_case(4, 8, 6, 4, 2)
    r = with_logits(R_IDS, R_W, R_LOGITS)
    out = layer(x, routing=r, capacity=Cap(1.0, overflow="reroute"))
    # t2's first choice moved from expert 0 to expert 2 with its weight 0.8 unchanged
    moved = hand_routing([[0, 1], [0, 2], [2, 1], [-1, 3]], R_W)
    assert_close(out.output, moe_ref.reference_moe(x, moved, layer.w13, layer.w2))
    assert (out.stats.rerouted, out.stats.dropped) == (1, 1)


def test_reroute_follows_router_probability_order():
    # same ids, but t2 now prefers 3 over 2: it takes the last room of expert 3
    logits = [row[:] for row in R_LOGITS]
    logits[2] = [4.0, 3.0, 1.0, 2.0]
    res = apply_capacity(with_logits(R_IDS, R_W, logits), 4, Cap(1.0, overflow="reroute"))
    assert ids_of(res) == [[0, 1], [0, 2], [3, 1], [2, 3]]  # t3 then finds room at 2
    assert (res.rerouted, res.dropped) == (2, 0)


def test_reroute_needs_logits():
    with pytest.raises(ValueError, match="logits"):
        apply_capacity(hand_routing(R_IDS, R_W), 4, Cap(1.0, overflow="reroute"))


def test_spill_runs_passes_of_at_most_c():
    # T=5, K=1, E=2, cf=0.4 -> C=1; expert 0 has 4 assignments -> 4 passes
    layer, x = make_case(5, 8, 6, 2, 1)
    r = hand_routing([[0], [0], [0], [0], [1]], [[1.0]] * 5)
    res = apply_capacity(r, 2, Cap(0.4, overflow="spill"))
    assert res.capacity == 1 and len(res.passes) == 4 and res.dropped == 0
    assert [p.topk_ids.view(-1).tolist() for p in res.passes] == [
        [0, -1, -1, -1, 1], [-1, 0, -1, -1, -1], [-1, -1, 0, -1, -1], [-1, -1, -1, 0, -1]]
    out = layer(x, routing=r, capacity=Cap(0.4, overflow="spill"))
    assert out.stats.passes == 4 and out.stats.dropped == 0
    assert_close(out.output, moe_ref.reference_moe(x, r, layer.w13, layer.w2))


def test_dropless_ignores_capacity():
    layer, x = make_case(4, 8, 6, 3, 2)
    r = hand_routing(IDS, W)
    out = layer(x, routing=r, capacity=Cap(0.1, overflow="dropless"))
    assert out.stats.capacity is None and out.stats.dropped == 0 and out.stats.passes == 1
    assert_close(out.output, moe_ref.reference_moe(x, r, layer.w13, layer.w2))


def test_error_names_expert_load_and_capacity():
    layer, x = make_case(4, 8, 6, 3, 2)
    r = hand_routing(IDS, W)  # expert 0 has load 4 > C = 2
    with pytest.raises(ValueError, match=r"expert 0 has load 4 > capacity 2"):
        layer(x, routing=r, capacity=Cap(0.75, overflow="error"))
    ok = layer(x, routing=r, capacity=Cap(1.5, overflow="error"))  # C = 4: fits
    assert ok.stats.capacity == 4 and ok.stats.dropped == 0
    assert_close(ok.output, moe_ref.reference_moe(x, r, layer.w13, layer.w2))


# ---------------------------------------------------------------------------------------------
# invariants under hypothesis (skewed routings, so capacity really bites)
# ---------------------------------------------------------------------------------------------


@st.composite
def cap_cases(draw):
    E = draw(st.sampled_from([1, 2, 3, 8]))
    K = draw(st.integers(1, min(E, 3)))
    T = draw(st.sampled_from([1, 2, 7, 33, 64]))
    skew = draw(st.sampled_from([0.0, 1.0, 3.0]))
    cf = draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 3.0]))
    min_cap = draw(st.integers(0, 2))
    policy = draw(st.sampled_from(["position", "probability"]))
    return T, E, K, skew, cf, min_cap, policy, draw(st.integers(0, 1000))


def skewed_case(T, E, K, skew, seed, D=8, F=6):
    layer, x = make_case(T, D, F, E, K, seed=seed)
    return layer, x, skewed_routing(x, layer.router_weight, K, skew)


@settings(max_examples=examples(60))
@given(case=cap_cases())
def test_capacity_invariants(case):
    T, E, K, skew, cf, min_cap, policy, seed = case
    _, _, r = skewed_case(T, E, K, skew, seed)
    ids = r.topk_ids
    C = expert_capacity(T, E, K, cf, min_cap)
    drop = apply_capacity(r, E, Cap(cf, min_cap, policy, "drop"))
    rer = apply_capacity(r, E, Cap(cf, min_cap, policy, "reroute"))
    spill = apply_capacity(r, E, Cap(cf, min_cap, policy, "spill"))
    for res in (drop, rer):
        f = res.final_ids  # [T, K]
        assert res.capacity == C
        assert int(moe_ref.expert_counts(f, E).max()) <= C  # no expert above C
        kept = int((f >= 0).sum())
        assert kept + res.dropped == T * K  # nothing lost without a number
        assert res.dropped_tokens == int((f < 0).all(-1).sum())
        for row in f.tolist():  # never the same expert twice in a token
            row = [e for e in row if e >= 0]
            assert len(row) == len(set(row))
    # drop keeps exactly the assignments whose rank within their expert is < C
    rank = priority_rank(ids, r.topk_weights, E, policy)
    assert torch.equal(drop.final_ids, torch.where(rank < C, ids, -1))
    # reroute keeps what drop kept and moves only dropped assignments
    same = drop.final_ids >= 0
    assert torch.equal(rer.final_ids[same], ids[same])
    moved = (~same) & (rer.final_ids >= 0)
    assert rer.rerouted == int(moved.sum()) and rer.dropped <= drop.dropped
    assert rer.dropped + rer.rerouted == drop.dropped
    # spill: ceil(max load / C) passes of at most C per expert, which add up to the routing
    load = moe_ref.expert_counts(ids, E)
    assert len(spill.passes) == math.ceil(int(load.max()) / C) and spill.dropped == 0
    total = torch.zeros(E, dtype=torch.long)
    for p in spill.passes:
        c = moe_ref.expert_counts(p.topk_ids, E)
        assert int(c.max()) <= C
        total += c
    assert torch.equal(total, load)


def run(layer, x, strategy, **kw):
    """grouped_mm has no float64 kernel: run a float32 copy of the layer (and report float32)."""
    if strategy == "grouped_mm":
        l32 = moe_ref.MoELayer(layer.cfg, dtype=torch.float32)
        l32.load_state_dict(layer.state_dict())
        return l32(x.float(), strategy=strategy, **kw), torch.float32
    return layer(x, strategy=strategy, **kw), x.dtype


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=examples(25))
@given(case=cap_cases())
def test_outputs_under_capacity_match_reference(strategy, case):
    T, E, K, skew, cf, min_cap, policy, seed = case
    layer, x, r = skewed_case(T, E, K, skew, seed)
    full = moe_ref.reference_moe(x, r, layer.w13, layer.w2)
    C = expert_capacity(T, E, K, cf, min_cap)
    load = moe_ref.expert_counts(r.topk_ids, E)
    for overflow in ("drop", "reroute", "spill", "dropless"):
        cap = Cap(cf, min_cap, policy, overflow)
        out, dt = run(layer, x, strategy, routing=r, capacity=cap)
        s = out.stats
        msg = f"{strategy} {overflow} T={T} E={E} K={K} skew={skew} cf={cf} C={C}"
        assert torch.equal(s.expert_counts, load), msg
        if overflow in ("spill", "dropless"):
            assert_close(out.output, full, dt, msg=msg)
            assert s.dropped == 0
            assert s.passes == (math.ceil(int(load.max()) / C) if overflow == "spill" else 1), msg
        else:
            final = apply_capacity(r, E, cap).final_ids
            kept = moe_ref.Routing(final, r.topk_weights)  # dropped assignments removed, weights kept
            assert_close(out.output, moe_ref.reference_moe(x, kept, layer.w13, layer.w2), dt, msg=msg)
            assert s.capacity == C and s.dropped == int((final < 0).sum()), msg
            assert s.dropped + int((final >= 0).sum()) == T * K
        if strategy == "padded":  # padded equals grouped under the same capacity
            g = layer(x, strategy="grouped", routing=r, capacity=cap)
            assert_close(out.output, g.output, dt, msg=msg)
            assert (s.dropped, s.rerouted, s.passes) == (g.stats.dropped, g.stats.rerouted, g.stats.passes)
            if overflow != "dropless":  # E*C rows per pass, minus the assignments that ran
                assert s.padded_slots == E * C * s.passes - (T * K - s.dropped), msg


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_capacity_above_tokens_drops_nothing(strategy):
    # every token on experts 0 and 1 (one hot pair); cf = E/K makes C = T, more than any expert can get
    T, E, K = 9, 4, 2
    layer, x = make_case(T, 8, 6, E, K, seed=2)
    r = hand_routing([[0, 1]] * T, [[0.7, 0.3]] * T)
    out, dt = run(layer, x, strategy, routing=r, capacity=Cap(E / K * 2, overflow="drop"))
    assert out.stats.capacity == 2 * T and out.stats.dropped == 0
    assert_close(out.output, moe_ref.reference_moe(x, r, layer.w13, layer.w2), dt)
    if strategy == "padded":
        assert out.stats.padded_slots == E * 2 * T - T * K


def test_min_capacity_raises_c():
    layer, x = make_case(2, 8, 6, 8, 1)
    r = hand_routing([[0], [0]], [[1.0], [1.0]])
    small = layer(x, routing=r, capacity=Cap(1.0, min_capacity=1))  # C = max(1, ceil(2/8)) = 1
    big = layer(x, routing=r, capacity=Cap(1.0, min_capacity=2))  # C = 2: both kept
    assert (small.stats.capacity, small.stats.dropped) == (1, 1)
    assert (big.stats.capacity, big.stats.dropped) == (2, 0)
    assert_close(big.output, moe_ref.reference_moe(x, r, layer.w13, layer.w2))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_zero_capacity_drop_everything(strategy):
    # C = 0 only arises with T = 0 through the formula; a strategy must still cope with C = 0 and
    # a routing whose every assignment is dropped (id -1): zero output, nothing computed on tokens
    layer, x = make_case(3, 8, 6, 4, 2, dtype=torch.float32)
    r = hand_routing([[-1, -1]] * 3, [[0.0, 0.0]] * 3)
    res = moe_ref.strategy.get_strategy(strategy)(x, r, layer.w13, layer.w2, capacity=0)
    assert res.y.shape == x.shape and res.y.abs().max() == 0
    empty = hand_routing(torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2))
    res0 = apply_capacity(empty, 4, Cap(1.0, min_capacity=0, overflow="drop"))
    assert res0.capacity == 0 and res0.dropped == 0 and res0.final_ids.shape == (0, 2)


@pytest.mark.parametrize("overflow", ["drop", "reroute", "spill", "dropless", "error"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_zero_tokens(strategy, overflow):
    layer, x = make_case(0, 8, 6, 4, 2, dtype=torch.float32)
    out = layer(x, strategy=strategy, capacity=Cap(1.0, min_capacity=0, overflow=overflow))
    assert out.output.shape == (0, 8) and out.stats.dropped == 0


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cf", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_bad_capacity_factor(cf):
    with pytest.raises(ValueError, match="capacity_factor"):
        Cap(capacity_factor=cf)
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(4, 2, 1, cf)


def test_bad_capacity_arguments():
    with pytest.raises(TypeError, match="capacity_factor"):
        Cap(capacity_factor="1.0")
    with pytest.raises(ValueError, match="drop_policy.*'random'"):
        Cap(drop_policy="random")
    with pytest.raises(ValueError, match="overflow.*'ignore'"):
        Cap(overflow="ignore")
    with pytest.raises(ValueError, match="min_capacity"):
        Cap(min_capacity=-1)
    with pytest.raises(ValueError, match="drop_policy"):
        priority_order(torch.ones(2, 1), "random")
    with pytest.raises(ValueError, match="num_tokens"):
        expert_capacity(-1, 2, 1, 1.0)
    with pytest.raises(TypeError, match="num_tokens.*float"):
        expert_capacity(3.0, 2, 1, 1.0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        expert_capacity(3, 2, 0, 1.0)
    with pytest.raises(TypeError, match="CapacityConfig"):
        apply_capacity(hand_routing([[0]]), 2, {"capacity_factor": 1.0})
    layer, x = make_case(3, 8, 6, 2, 1)
    with pytest.raises(TypeError, match="CapacityConfig"):
        layer(x, capacity=1.25)
