"""Expert parallelism past one node: time model, hierarchical all-to-all, node-limited routing, replication,
overlap, and the torchrun checks of the hierarchical and overlapped schemes.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, P ranks = N nodes × L ranks per node, M max nodes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_ref
from helpers import TOL, examples, make_case
from moe_ref.parallel import (
    Topology,
    all_to_all_time,
    inter_node_bytes,
    launch_torchrun,
    layer_comm_time,
    layout_groups,
    link_classes,
    simulate_ep,
    topology_preset,
)
from moe_ref.parallel.replicate import (
    contiguous_plan,
    load_ratio,
    physical_routing,
    rank_loads,
    replicate_experts,
    replicated_weights,
)
from moe_ref.parallel.timeline import layer_timeline, micro_batch_loads
from moe_ref.router import node_limited_routing, node_limited_topk, route_node_limited
from moe_ref.skew import random_routing

D, F = 16, 24
F64 = TOL[torch.float64]


# ----------------------------------------------------------------------------- time model
def test_time_model_known_answers():
    topo = Topology(2, 2, intra_bps=100.0, inter_bps=10.0, intra_latency_s=1.0, inter_latency_s=2.0)
    assert topo.world_size == 4 and [topo.node_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert link_classes(topo).tolist() == [[0, 1, 2, 2], [1, 0, 2, 2], [2, 2, 0, 1], [2, 2, 1, 0]]
    m = torch.zeros(4, 4)
    m[0, 1] = 300  # intra: 1 + 300/100 = 4 s
    assert all_to_all_time(m, topo) == pytest.approx(4.0)
    m[0, 2] = 50  # inter, concurrent with intra: 2 + 50/10 = 7 s
    assert all_to_all_time(m, topo) == pytest.approx(7.0)
    m[3, 2] = 80  # rank 2 receives 50 over the NIC (7 s) and 80 over NVLink (1.8 s)
    m[1, 2] = 40  # now rank 2 receives 90 across: 2 + 9 = 11 s, the slowest
    assert all_to_all_time(m, topo) == pytest.approx(11.0)
    assert all_to_all_time(m, topo, per_rank=True).tolist() == pytest.approx([7.0, 6.0, 11.0, 1.8])
    m.fill_diagonal_(1e9)  # local copies cost nothing
    assert all_to_all_time(m, topo) == pytest.approx(11.0)
    assert inter_node_bytes(m, topo) == 90
    assert all_to_all_time(torch.zeros(4, 4), topo) == 0.0
    # dispatch + combine (transpose); hierarchical: inter step then intra step, times add
    m2 = torch.zeros(4, 4)
    m2[0, 2], m2[0, 1] = 10, 100
    assert layer_comm_time(m2, topo) == pytest.approx(2 * 3.0)  # max(2 + 1, 1 + 1), twice
    assert layer_comm_time(m2, topo, hierarchical=True) == pytest.approx(2 * (3.0 + 2.0))


def test_topology_presets_and_errors():
    t = topology_preset("h200-2nodes")
    assert (t.nodes, t.ranks_per_node, t.intra_bps, t.inter_bps) == (2, 8, 450e9, 50e9)
    assert topology_preset("pcie-node").intra_bps == 64e9
    assert topology_preset("h200-node", nodes=3).world_size == 24
    one = Topology(1, 8)  # 8 MB to every other rank over NVLink: 7 * 8e6 / 450e9 + α
    m = torch.full((8, 8), 8e6)
    assert all_to_all_time(m, one) == pytest.approx(3e-6 + 7 * 8e6 / 450e9)
    with pytest.raises(ValueError, match="topology preset"):
        topology_preset("dgx-9000")
    with pytest.raises(ValueError, match=r"traffic must be \[P, P\] = \[4, 4\]"):
        all_to_all_time(torch.zeros(3, 3), Topology(2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        all_to_all_time(-torch.ones(4, 4), Topology(2, 2))
    with pytest.raises(ValueError, match="intra_bps"):
        Topology(1, 2, intra_bps=0.0)
    with pytest.raises(TypeError, match="nodes"):
        Topology(1.5, 2)


# ----------------------------------------------------------------------------- hierarchical all-to-all
def test_layout_groups():
    assert layout_groups(4, 2) == [(0, 1), (2, 3), (0, 2), (1, 3)]
    assert layout_groups(2, 2) == [(0, 1), (0,), (1,)]
    assert layout_groups(1, 1) == [(0,)]
    with pytest.raises(ValueError, match="does not divide world_size=4"):
        layout_groups(4, 3)


@settings(max_examples=examples(20), deadline=None)
@given(layout=st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (8, 1)]),
       T=st.sampled_from([0, 1, 7, 33]), K=st.integers(1, 8), skew=st.sampled_from([0.0, 2.0]),
       seed=st.integers(0, 30), uneven=st.booleans())
def test_hierarchical_matches_reference_and_never_crosses_more(layout, T, K, skew, seed, uneven):
    N, L = layout
    P, E = N * L, 8
    K = min(K, E)
    layer, x = make_case(T, D, F, E, K, dtype=torch.float64, seed=seed)
    r = random_routing(T, E, K, skew=skew, seed=seed)
    splits = [T] + [0] * (P - 1) if uneven else None
    ref = moe_ref.reference_moe(x, r, layer.w13, layer.w2)
    flat = simulate_ep(x, r, layer.w13, layer.w2, P, token_splits=splits)
    hier = simulate_ep(x, r, layer.w13, layer.w2, P, token_splits=splits, scheme="hierarchical", ranks_per_node=L)
    torch.testing.assert_close(hier.output, ref, **F64)
    assert hier.rank_load.tolist() == flat.rank_load.tolist()
    topo = Topology(N, L)
    h, f = inter_node_bytes(hier.traffic_bytes["tokens"], topo), inter_node_bytes(flat.traffic_bytes["tokens"], topo)
    assert h <= f
    # exactly one row per (token, remote destination node), each way
    src = torch.repeat_interleave(torch.arange(P), torch.tensor(hier.rank_stats[0].rank_tokens.tolist()))
    tok_node = src // L  # [T]
    En = E // N
    dest = torch.zeros(T, N, dtype=torch.bool)
    for t in range(T):
        for e in r.topk_ids[t].tolist():
            dest[t, e // En] = True
    remote = int((dest & (torch.arange(N)[None, :] != tok_node[:, None])).sum())
    assert h == 2 * remote * D * 8


def test_hierarchical_with_capacity_and_strategies():
    layer, x = make_case(50, D, F, 8, 2, dtype=torch.float64, seed=4)
    r = moe_ref.skewed_routing(x, layer.router_weight, 2, 2.0)
    for ov in ("drop", "reroute", "spill"):
        cap = moe_ref.CapacityConfig(capacity_factor=0.6, overflow=ov)
        single = moe_ref.moe_forward(x, r, layer.w13, layer.w2, capacity=cap)
        for scheme in ("hierarchical", "overlap"):
            sim = simulate_ep(x, r, layer.w13, layer.w2, 4, token_splits=[0, 10, 40, 0], capacity=cap,
                              scheme=scheme, ranks_per_node=2)
            torch.testing.assert_close(sim.output, single.output, **F64)
            assert sim.rank_stats[0].dropped == single.stats.dropped
    sim = simulate_ep(x.float(), r, layer.w13.float(), layer.w2.float(), 4, scheme="hierarchical",
                      ranks_per_node=2, strategy="padded")
    torch.testing.assert_close(sim.output.double(), moe_ref.reference_moe(x, r, layer.w13, layer.w2),
                               **TOL[torch.float32])
    with pytest.raises(ValueError, match="needs ranks_per_node"):
        simulate_ep(x, r, layer.w13, layer.w2, 4, scheme="hierarchical")
    with pytest.raises(ValueError, match="does not divide"):
        simulate_ep(x, r, layer.w13, layer.w2, 4, scheme="hierarchical", ranks_per_node=3)


# ----------------------------------------------------------------------------- overlap
@pytest.mark.parametrize("T, splits", [(0, None), (1, None), (37, None), (37, [0, 30, 7, 0])])
def test_overlap_matches_flat(T, splits):
    layer, x = make_case(T, D, F, 8, 2, dtype=torch.float64, seed=2)
    r = random_routing(T, 8, 2, skew=1.0, seed=2)
    flat = simulate_ep(x, r, layer.w13, layer.w2, 4, token_splits=splits)
    ov = simulate_ep(x, r, layer.w13, layer.w2, 4, token_splits=splits, scheme="overlap")
    torch.testing.assert_close(ov.output, flat.output, **F64)
    assert torch.equal(ov.traffic_rows, flat.traffic_rows)
    assert ov.link_bytes("tokens") == flat.link_bytes("tokens")


def test_timeline_overlap_hides_compute():
    r = random_routing(4096, 16, 2, seed=0)
    topo = topology_preset("h200-2nodes", ranks_per_node=4)
    one = layer_timeline(micro_batch_loads(r, 16, 8, 1), topo, 2048, 4096)
    two = layer_timeline(micro_batch_loads(r, 16, 8, 2), topo, 2048, 4096)
    assert sum(int(ld["traffic_rows"].sum()) for ld in micro_batch_loads(r, 16, 8, 2)) == 4096 * 2
    assert one["total_s"] == pytest.approx(one["comm_s"] + one["compute_s"], rel=1e-9)  # no overlap
    assert two["total_s"] < 0.8 * one["total_s"]
    assert two["total_s"] >= max(two["comm_s"], two["compute_s"]) - 1e-12
    # small batches: twice the latencies and (memory-bound) twice the weight reads; overlap loses
    small = random_routing(2048, 16, 2, seed=0)
    t1, t2 = (layer_timeline(micro_batch_loads(small, 16, 8, m), topo, 1024, 2048)["total_s"] for m in (1, 2))
    assert t2 > t1
    lanes = {(e["rank"], e["lane"]) for e in two["events"]}
    assert len(lanes) == 2 * 8 and all(e["end"] >= e["start"] for e in two["events"])
    # micro-batch 1's dispatch runs during micro-batch 0's compute
    ev = {(e["rank"], e["label"]): e for e in two["events"]}
    assert ev[(0, "dispatch 1")]["start"] < ev[(0, "experts 0")]["end"]
    with pytest.raises(ValueError, match="topology has 4"):
        layer_timeline(micro_batch_loads(r, 16, 8, 1), Topology(2, 2), 64, 64)


# ----------------------------------------------------------------------------- node-limited routing
@settings(max_examples=examples(40), deadline=None)
@given(N=st.sampled_from([1, 2, 4, 8]), En=st.sampled_from([1, 2, 3]), K=st.integers(1, 8), M=st.integers(1, 8),
       T=st.sampled_from([0, 1, 9, 40]), seed=st.integers(0, 100), scoring=st.sampled_from(["softmax", "sigmoid"]))
def test_node_limited_routing_spans_at_most_m_nodes(N, En, K, M, T, seed, scoring):
    E = N * En
    M = min(M, N)
    K = min(K, M * En)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    r = node_limited_routing(logits, K, num_nodes=N, max_nodes=M, scoring=scoring)
    moe_ref.router.validate_routing(r, T, E)
    nodes = r.topk_ids // En  # [T, K]
    assert all(len(set(row)) <= M for row in nodes.tolist())
    torch.testing.assert_close(r.topk_weights.sum(-1), torch.ones(T))
    full = moe_ref.skew.routing_from_logits(logits, K, scoring=scoring)
    if M == N:  # no limit: exactly the unrestricted router
        assert torch.equal(r.topk_ids, full.topk_ids) and torch.equal(r.topk_weights, full.topk_weights)
    # the chosen experts are the best ones on their nodes: scores sorted, none better left on a kept node
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    for t in range(T):
        kept = set(nodes[t].tolist())
        allowed = [e for e in range(E) if e // En in kept]
        best = sorted(allowed, key=lambda e: -float(scores[t, e]))[:K]
        assert sorted(float(scores[t, e]) for e in best) == pytest.approx(
            sorted(float(scores[t, e]) for e in r.topk_ids[t].tolist()))


def test_node_limited_picks_nodes_by_top2_sum():
    # node 0: experts 0.30, 0.29 (top-2 sum 0.59); node 1: 0.40, 0.01 (0.41): M=1 keeps node 0
    s = torch.tensor([[0.30, 0.29, 0.40, 0.01]])
    w, ids = node_limited_topk(s, 2, num_nodes=2, max_nodes=1)
    assert ids.tolist() == [[0, 1]] and w[0].tolist() == pytest.approx([0.30, 0.29])
    w, ids = node_limited_topk(s, 2, num_nodes=2, max_nodes=1, node_score_k=1)  # by the best expert: node 1
    assert ids.tolist() == [[2, 3]]
    assert node_limited_topk(s, 2, num_nodes=2, max_nodes=2)[1].tolist() == [[2, 0]]  # unrestricted
    # E = 1 expert per node: M nodes = M experts
    w, ids = node_limited_topk(torch.tensor([[0.1, 0.5, 0.25, 0.15]]), 2, num_nodes=4, max_nodes=2)
    assert sorted(ids.tolist()[0]) == [1, 2]


def test_route_node_limited_and_errors():
    layer, x = make_case(30, D, F, 8, 2, dtype=torch.float32, seed=1)
    full = moe_ref.route(x, layer.router_weight, 2)
    same = route_node_limited(x, layer.router_weight, 2, num_nodes=4, max_nodes=4)
    assert torch.equal(same.topk_ids, full.topk_ids) and torch.equal(same.topk_weights, full.topk_weights)
    lim = route_node_limited(x, layer.router_weight, 2, num_nodes=2, max_nodes=1)
    assert ((lim.topk_ids // 4)[:, 0] == (lim.topk_ids // 4)[:, 1]).all()
    s = torch.rand(3, 8)
    with pytest.raises(ValueError, match="not divisible by num_nodes=3"):
        node_limited_topk(s, 2, num_nodes=3, max_nodes=1)
    with pytest.raises(ValueError, match="max_nodes must be <= 2"):
        node_limited_topk(s, 2, num_nodes=2, max_nodes=3)
    with pytest.raises(ValueError, match="max_nodes must be >= 1"):
        node_limited_topk(s, 2, num_nodes=2, max_nodes=0)
    with pytest.raises(ValueError, match="do not fit on max_nodes=1"):
        node_limited_topk(s, 3, num_nodes=4, max_nodes=1)
    with pytest.raises(ValueError, match="node_score_k"):
        node_limited_topk(s, 2, num_nodes=2, max_nodes=1, node_score_k=5)
    with pytest.raises(ValueError, match="scores must be"):
        node_limited_topk(s[0], 2, num_nodes=2, max_nodes=1)
    with pytest.raises(TypeError, match="num_nodes must be an int"):
        node_limited_topk(s, 2, num_nodes=2.0, max_nodes=1)
    with pytest.raises(ValueError, match="scoring"):
        node_limited_routing(s, 2, num_nodes=2, max_nodes=1, scoring="relu")
    with pytest.raises(ValueError, match="D=16"):
        route_node_limited(torch.randn(3, 5), layer.router_weight, 2, num_nodes=2, max_nodes=1)


def test_node_limited_row_saves_inter_node_bytes_with_hierarchical_dispatch():
    from moe_ref.parallel.node_limit import node_limited_row, node_span

    layer, x = make_case(64, D, F, 8, 2, dtype=torch.float32, seed=3)
    row = node_limited_row(x, layer, 2, 2, 1)
    assert row["span_limited"] == 1.0 and row["span_full"] > 1.0
    assert row["inter_hier_limited"] < row["inter_hier_full"] and row["saving_hier"] > 0
    assert row["rel_error"] > 0 and 0 < row["tokens_rerouted"] <= 1
    same = node_limited_row(x, layer, 2, 2, 2)
    # the same routing: only float32 rounding differs (the hierarchical combine adds per-node partial sums)
    assert same["rel_error"] < 1e-6 and same["saving_flat"] == 0.0 and same["saving_hier"] == 0.0
    assert node_span(moe_ref.Routing(topk_ids=torch.tensor([[0, 7], [1, -1]]), topk_weights=torch.ones(2, 2)),
                     8, 2).tolist() == [2, 1]


# ----------------------------------------------------------------------------- redundant experts
def test_replication_keeps_the_output_and_lowers_the_max_load():
    E, K, P = 8, 2, 4
    layer, x = make_case(200, D, F, E, K, dtype=torch.float64, seed=0)
    r = random_routing(200, E, K, skew=1.5, seed=3)
    loads = moe_ref.expert_counts(r.topk_ids, E)
    ref = moe_ref.reference_moe(x, r, layer.w13, layer.w2)
    before = rank_loads(r, contiguous_plan(E, P))
    assert before.tolist() == simulate_ep(x, r, layer.w13, layer.w2, P).rank_load.tolist()
    prev = load_ratio(before)
    for R in (4, 8):
        plan = replicate_experts(loads, R, P)
        assert int(plan.copies.sum()) == E + R and plan.num_slots == E + R
        assert int(plan.copies[0]) == int(plan.copies.max()) > 1  # the hottest expert got copies
        phys = physical_routing(r, plan)
        w13, w2 = replicated_weights(layer.w13, layer.w2, plan)
        sim = simulate_ep(x, phys, w13, w2, P)
        torch.testing.assert_close(sim.output, ref, **F64)  # the output is unchanged
        after = rank_loads(r, plan)
        assert sim.rank_load.tolist() == after.tolist() and int(after.sum()) == 200 * K
        assert load_ratio(after) < load_ratio(before) and load_ratio(after) <= prev + 1e-9
        prev = load_ratio(after)
        # a replicated expert's assignments split evenly over its copies
        counts = moe_ref.expert_counts(phys.topk_ids, plan.num_slots)
        for e in range(E):
            c = counts[plan.slots_of(e)]
            assert int(c.max() - c.min()) <= 1
    assert prev < 1.1


def test_replication_known_packing_and_errors():
    # copies: expert 0 twice more (8/1 > 4, then 8/2 = 4 ties expert 1: lower id). Packing, heaviest first:
    # e1 (4) -> rank 0; e0 (8/3) -> ranks 1, 2, then rank 0 (no copy of e0 yet); e2 -> rank 1, e3 -> rank 2
    plan = replicate_experts(torch.tensor([8, 4, 2, 2]), 2, 3)
    assert plan.copies.tolist() == [3, 1, 1, 1]
    assert plan.planned_rank_load.tolist() == pytest.approx([20 / 3, 14 / 3, 14 / 3])
    assert plan.slot_expert.view(3, 2).tolist() == [[0, 1], [0, 2], [0, 3]]
    dropped = moe_ref.Routing(topk_ids=torch.tensor([[0, -1], [0, 1]]), topk_weights=torch.ones(2, 2))
    assert physical_routing(dropped, plan).topk_ids.tolist() == [[0, -1], [2, 1]]
    with pytest.raises(ValueError, match="not divisible by world_size=3"):
        replicate_experts(torch.ones(4), 1, 3)
    with pytest.raises(ValueError, match="loads must be"):
        replicate_experts(torch.ones(2, 2), 0, 1)
    with pytest.raises(ValueError, match="num_replicas must be >= 0"):
        replicate_experts(torch.ones(4), -1, 2)
    with pytest.raises(TypeError, match="ReplicaPlan"):
        physical_routing(dropped, "plan")
    with pytest.raises(ValueError, match="E=4 experts"):
        replicated_weights(torch.zeros(3, 2, 2), torch.zeros(3, 2, 1), plan)


# ----------------------------------------------------------------------------- real processes
@pytest.mark.slow
@pytest.mark.parametrize("cli_args", [
    ["--check", "--ranks-per-node", "2", "--tokens", "64"],
    ["--check", "--overlap", "--tokens", "50", "--uneven", "--skew", "1.0", "--capacity-factor", "0.75",
     "--overflow", "spill"],
])
def test_torchrun_hierarchical_and_overlap_checks_pass(cli_args):
    code, out = launch_torchrun(4, cli_args, timeout=240)
    assert code == 0, out[-4000:]
    assert "CHECK PASSED on all ranks" in out, out[-4000:]
    if "--ranks-per-node" in cli_args:
        assert out.count("check OK (grouped too)") == 4, out[-4000:]
        last = out.strip().splitlines()[-3:]
        assert "2 nodes x 2 ranks" in last[0] and "inter-node" in last[1] and "hierarchical" in last[1], last
    else:
        assert "scheme=overlap" in out and out.count("check OK") == 4, out[-4000:]


@pytest.mark.slow
def test_torchrun_bad_layout_fails_clearly():
    code, out = launch_torchrun(2, ["--check", "--ranks-per-node", "3"], timeout=120)
    assert code != 0 and "--ranks-per-node 3 must divide the world size 2" in out, out[-3000:]


# ----------------------------------------------------------------------------- choosing a strategy, charts, panels
def test_advise_ranks_options_with_reasons():
    from moe_ref.advise import Workload, advice_table, format_advice, option_sweep

    lat = Workload("decode", 64, True, skew=1.0)
    one = moe_ref.advise(lat, "single-gpu")
    assert {r["option"] for r in one} >= {"grouped, dropless", "dense (every expert on every token)"}
    multi = moe_ref.advise(lat, "h200-2nodes")
    assert [r["rank"] for r in multi] == list(range(1, len(multi) + 1))
    ok = [r for r in multi if r["ok"]]
    assert ok == multi[:len(ok)] and [r["layer_us"] for r in ok] == sorted(r["layer_us"] for r in ok)
    pad = next(r for r in multi if r["option"].startswith("padded"))
    assert pad["drop_share"] > 0 and not pad["ok"]  # a latency-sensitive workload drops nothing
    hier = next(r for r in multi if r["option"] == "hierarchical all-to-all")
    flat = next(r for r in multi if r["option"] == "grouped, dropless")
    assert hier["inter_node_mib"] < flat["inter_node_mib"] and flat["ep_degree"] == 16
    assert all(any(ch.isdigit() for ch in r["reason"]) for r in multi)
    thr = moe_ref.advise(Workload("prefill", 64, False, skew=1.0), "h200-2nodes")
    assert {r["option"] for r in thr} == {r["option"] for r in multi}
    table = advice_table({"a": multi})
    assert table[0]["best"] == multi[0]["option"] and "|" in format_advice(multi)
    sw = option_sweep(lat, "h200-node", tokens=[4, 32])
    assert {r["tokens"] for r in sw} == {4, 32}
    with pytest.raises(ValueError, match="not divisible"):
        moe_ref.advise(lat, Topology(3, 1))
    with pytest.raises(TypeError, match="workload"):
        moe_ref.advise("decode", "single-gpu")
    with pytest.raises(ValueError, match="exactly one"):
        option_sweep(lat, "h200-node")
    with pytest.raises(ValueError, match="tokens_per_step"):
        Workload("x", 0, True)


@pytest.mark.slow  # draws every multi-node chart and panel
def test_multinode_plots_and_panels():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from moe_ref import plots, widgets
    from moe_ref.advise import advice_cells

    before = set(plt.get_fignums())
    r = random_routing(64, 8, 2, seed=0)
    tls = [layer_timeline(micro_batch_loads(r, 8, 4, m), Topology(2, 2), 64, 64) for m in (1, 2)]
    fig = plots.plot_timeline(tls)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert len(fig.axes[1].patches) >= len(tls[1]["events"])
    rows = [dict(layer=0, inter_flat_full=4, inter_flat_limited=4, inter_hier_full=3, inter_hier_limited=2,
                 rel_error=0.1)]
    assert len(plots.plot_inter_node_bytes(rows).axes[0].patches) == 4
    assert len(plots.plot_replication_loads([4, 1, 1, 2], [2, 2, 2, 2]).axes[0].patches) == 8
    cells = {"c": [dict(option="a", rank=1, layer_us=2.0, ok=True), dict(option="b", rank=2, layer_us=3.0, ok=False)]}
    assert isinstance(plots.plot_advice(cells), Figure)
    assert isinstance(plots.plot_option_sweep([dict(tokens=1, option="a", layer_us=1.0, ok=True),
                                               dict(tokens=4, option="a", layer_us=2.0, ok=False)]), Figure)
    panel = widgets.multinode_panel(tokens=64)
    assert panel.renders == 1 and panel.error is None
    panel.controls["max_nodes"].value = 1
    assert panel.renders == 2 and panel.error is None
    panel.controls["ranks_per_node"].value = 4
    panel.controls["nodes"].value = 4  # 16 ranks: E + R = 20 slots do not divide, said in the panel
    assert "not divisible by world_size=16" in panel.error
    panel.controls["replicas"].value = 16
    assert panel.error is None
    calls = []
    sp = widgets.strategy_panel(lambda **v: calls.append(v) or cells, tokens=8)
    assert sp.renders == 1 and calls[0]["tokens"] == 8
    sp.controls["skew"].value = 2.0
    assert sp.renders == 2 and calls[-1]["skew"] == 2.0
    assert set(advice_cells(8, 0.5, "single-gpu")) == {"latency-sensitive, T=8, single-gpu",
                                                       "throughput-oriented, T=8, single-gpu"}
    assert set(plt.get_fignums()) == before, "plot functions must not register pyplot figures"
