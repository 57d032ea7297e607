"""Routing skew (moe_ref.skew) and load/quality metrics (moe_ref.metrics)."""

import math

import pytest
import torch

import moe_ref
from helpers import hand_routing, make_case
from moe_ref.metrics import (
    capacity_quality_table,
    coefficient_of_variation,
    drop_share,
    format_table,
    load_imbalance,
    padding_waste,
    relative_error,
)
from moe_ref.skew import expert_popularity, random_routing, skewed_routing

# ---------------------------------------------------------------------------------------------
# skew
# ---------------------------------------------------------------------------------------------


def test_expert_popularity_shape_and_order():
    u = expert_popularity(8, 0.0)
    torch.testing.assert_close(u, torch.full((8,), 1 / 8, dtype=torch.float64))
    p = expert_popularity(8, 1.0)
    assert float(p.sum()) == pytest.approx(1.0)
    assert bool((p[:-1] > p[1:]).all())  # expert 0 hottest
    assert float(p[0] / p[1]) == pytest.approx(2.0)  # Zipf: p ∝ 1/rank
    h = expert_popularity(8, 1.0, hot_seed=3)
    assert sorted(h.tolist()) == sorted(p.tolist()) and not torch.equal(h, p)  # shuffled ranks
    assert torch.equal(h, expert_popularity(8, 1.0, hot_seed=3))
    assert expert_popularity(1, 5.0).tolist() == [1.0]


@pytest.mark.parametrize("skew", [-0.5, float("nan"), float("inf")])
def test_bad_skew(skew):
    with pytest.raises(ValueError, match="skew"):
        expert_popularity(4, skew)


def test_bad_skew_arguments():
    with pytest.raises(TypeError, match="skew"):
        expert_popularity(4, "1")
    with pytest.raises(ValueError, match="num_experts"):
        expert_popularity(0, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        random_routing(4, 4, 5)
    with pytest.raises(ValueError, match="num_tokens"):
        random_routing(-1, 4, 1)


def loads(r, E):
    return moe_ref.expert_counts(r.topk_ids, E)


def test_random_routing_is_a_valid_deterministic_routing():
    r = random_routing(500, 8, 3, skew=1.0, seed=7)
    assert r.topk_ids.shape == (500, 3) and r.logits.shape == (500, 8)
    moe_ref.router.validate_routing(r, 500, 8)  # in range, no expert twice in a token
    torch.testing.assert_close(r.topk_weights.sum(-1), torch.ones(500))
    again = random_routing(500, 8, 3, skew=1.0, seed=7)
    assert torch.equal(r.topk_ids, again.topk_ids) and torch.equal(r.topk_weights, again.topk_weights)
    assert not torch.equal(r.topk_ids, random_routing(500, 8, 3, skew=1.0, seed=8).topk_ids)
    assert random_routing(0, 8, 2).topk_ids.shape == (0, 2)


def test_random_routing_loads_follow_popularity():
    E, T = 8, 20_000
    p = expert_popularity(E, 1.0)
    share = loads(random_routing(T, E, 1, skew=1.0, seed=1), E).double() / T  # K=1: share ~ p
    assert (share - p).abs().max() < 0.02
    uniform = loads(random_routing(T, E, 2, skew=0.0, seed=1), E)
    assert load_imbalance(uniform) < 1.05  # skew 0: roughly uniform (expected sd of a count ~ 1.3% of mean)


def test_larger_skew_gives_larger_imbalance():
    imb = [load_imbalance(loads(random_routing(4096, 8, 2, skew=s, seed=0), 8)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert imb[0] < 1.1 and all(a < b for a, b in zip(imb, imb[1:])), imb
    layer, x = make_case(2048, 32, 8, 8, 2, dtype=torch.float32)
    imb = [load_imbalance(loads(skewed_routing(x, layer.router_weight, 2, s), 8)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert imb[0] < 1.25 and all(a < b for a, b in zip(imb, imb[1:])), imb


def test_skewed_routing_zero_skew_is_the_router():
    layer, x = make_case(64, 16, 8, 6, 2, dtype=torch.float32)
    r0 = layer.route(x)
    r = skewed_routing(x, layer.router_weight, 2, 0.0)
    assert torch.equal(r.topk_ids, r0.topk_ids)
    torch.testing.assert_close(r.topk_weights, r0.topk_weights)
    rs = skewed_routing(x, layer.router_weight, 2, 1.5, hot_seed=2)
    torch.testing.assert_close(rs.logits, r0.logits + expert_popularity(6, 1.5, hot_seed=2).log().float())
    # the biased logits are kept, so reroute can use them
    out = layer(x, routing=rs, capacity=moe_ref.CapacityConfig(0.5, overflow="reroute"))
    assert out.stats.rerouted > 0
    with pytest.raises(ValueError, match="D=16"):
        skewed_routing(x[:, :8], layer.router_weight, 2, 1.0)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_load_imbalance_and_cv_known_values():
    assert load_imbalance([2, 2, 2, 2]) == 1.0
    assert load_imbalance(torch.tensor([4, 0, 0, 0])) == 4.0
    assert load_imbalance([3, 1]) == 1.5
    assert load_imbalance([0, 0, 0]) == 1.0  # nothing routed: nothing uneven
    assert coefficient_of_variation([5, 5, 5]) == 0.0
    assert coefficient_of_variation([2, 0]) == 1.0  # population std 1, mean 1
    assert coefficient_of_variation([4, 0, 0, 0]) == pytest.approx(math.sqrt(3))
    assert coefficient_of_variation([0, 0]) == 0.0
    st = moe_ref.MoEStats(expert_counts=torch.tensor([3, 1]))
    assert load_imbalance(st) == 1.5  # an MoEStats is read through its expert_counts


@pytest.mark.parametrize("bad,err", [([], ValueError), ([[1, 2]], ValueError), ([1, -1], ValueError),
                                     ("abc", TypeError), ([1.0, float("nan")], ValueError)])
def test_metrics_bad_counts(bad, err):
    with pytest.raises(err, match="counts"):
        load_imbalance(bad)
    with pytest.raises(err, match="counts"):
        coefficient_of_variation(bad)


def test_drop_share_and_padding_waste():
    layer, x = make_case(4, 8, 6, 3, 2)
    r = hand_routing([[0, 1], [0, 2], [1, 0], [0, 1]])  # C = 2 at cf 0.75: 3 of 8 dropped
    cap = moe_ref.CapacityConfig(0.75)
    s = layer(x, strategy="padded", routing=r, capacity=cap).stats
    assert drop_share(s) == 3 / 8
    assert padding_waste(s) == (3 * 2 - 5) / (3 * 2)  # E*C = 6 rows computed, 5 kept assignments
    g = layer(x, strategy="grouped", routing=r, capacity=cap).stats
    assert drop_share(g) == 3 / 8 and padding_waste(g) == 0.0
    empty = moe_ref.MoEStats(expert_counts=torch.zeros(3, dtype=torch.long))
    assert drop_share(empty) == 0.0 and padding_waste(empty) == 0.0
    with pytest.raises(TypeError, match="MoEStats"):
        drop_share({"dropped": 1})
    with pytest.raises(TypeError, match="MoEStats"):
        padding_waste(None)


def test_relative_error():
    y = torch.tensor([[3.0, 4.0]])
    assert relative_error(y, y) == 0.0
    assert relative_error(torch.zeros(1, 2), y) == 1.0
    assert relative_error(torch.tensor([[3.0, 5.0]]), y) == pytest.approx(0.2)
    assert relative_error(torch.zeros(1, 2), torch.zeros(1, 2)) == 0.0
    assert relative_error(y, torch.zeros(1, 2)) == math.inf


def test_capacity_quality_table():
    layer, x = make_case(96, 16, 16, 4, 2, dtype=torch.float32, seed=5)
    cfs, skews = [0.5, 1.0, 2.0], [0.0, 2.0]
    rows = capacity_quality_table(layer, x, cfs, skews)
    assert len(rows) == len(cfs) * len(skews) * 2
    assert [(r["skew"], r["capacity_factor"], r["overflow"]) for r in rows] == [
        (s, cf, ov) for s in skews for cf in cfs for ov in ("drop", "reroute")]
    by = {(r["skew"], r["capacity_factor"], r["overflow"]): r for r in rows}
    for s in skews:
        drops = [by[(s, cf, "drop")]["drop_share"] for cf in cfs]
        assert all(a >= b for a, b in zip(drops, drops[1:]))  # more room, fewer drops
        for cf in cfs:
            d, rr = by[(s, cf, "drop")], by[(s, cf, "reroute")]
            assert rr["drop_share"] <= d["drop_share"]
            assert d["drop_share"] == d["dropped"] / (96 * 2)
            assert d["capacity"] == moe_ref.expert_capacity(96, 4, 2, cf)
            assert (d["rel_error"] == 0) == (d["dropped"] == 0)
    assert by[(2.0, 0.5, "drop")]["drop_share"] > by[(0.0, 0.5, "drop")]["drop_share"]  # skew costs drops
    assert by[(2.0, 0.5, "drop")]["load_imbalance"] > by[(0.0, 0.5, "drop")]["load_imbalance"]
    # one row recomputed independently
    r = skewed_routing(x, layer.router_weight, 2, 2.0)
    cap = moe_ref.CapacityConfig(1.0, overflow="drop")
    want = relative_error(layer(x, routing=r, capacity=cap).output, moe_ref.reference_moe(x, r, layer.w13, layer.w2))
    assert by[(2.0, 1.0, "drop")]["rel_error"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert "| 2 | 1 |" in format_table(rows)
    with pytest.raises(ValueError, match="overflow"):
        capacity_quality_table(layer, x, [1.0], [0.0], overflows=("drop", "nope"))
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_quality_table(layer, x, [0.0], [0.0])


def test_capacity_table_cli(tmp_path, capsys):
    import json

    from moe_ref.metrics import main

    out = tmp_path / "cq.json"
    rows = main(["--tokens", "40", "--d-model", "8", "--d-ff", "8", "--experts", "4", "--top-k", "2",
                 "--capacity-factors", "0.5", "2", "--skews", "0", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert len(rows) == 2 * 2 * 2 and text.count("| drop |") == 4 and text.count("| reroute |") == 4
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["meta"]["args"]["tokens"] == 40


def test_capacity_table_cli_refuses_a_negative_token_count(capsys):
    from moe_ref.metrics import main

    with pytest.raises(SystemExit) as exc:
        main(["--tokens", "-5"])
    assert exc.value.code == 2 and "--tokens must be >= 0, got -5" in capsys.readouterr().err
