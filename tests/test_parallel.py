"""Expert parallelism: real gloo process groups (2 and 4 ranks) and the in-process simulation.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, P ranks, El = E / P.
One spawned group per world size runs many checks (process start-up is the slow part); every group is
bounded by a collective timeout and a hard kill, so a failure shows as an error, never a hang.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_ref
from helpers import TOL, examples, make_case
from moe_ref.ep_plan import AllGather, get_scheme
from moe_ref.parallel import (
    ep_forward,
    launch_torchrun,
    run_local_group,
    run_with_torch_distributed,
    shard_experts,
    simulate_ep,
    split_routing,
    split_tokens,
)
from moe_ref.skew import random_routing

D, F, E, K = 16, 24, 8, 2
F64 = TOL[torch.float64]


def _case(T, seed=0):
    layer, x = make_case(T, D, F, E, K, dtype=torch.float64, seed=seed)
    return layer, x


def _single(x, routing, layer, capacity=None):
    """Single-process ground truth: moe_forward (with capacity) and reference_moe of its passes."""
    if x.shape[0] == 0:
        return torch.zeros_like(x), None
    out = moe_ref.moe_forward(x, routing, layer.w13, layer.w2, capacity=capacity)
    passes = moe_ref.apply_capacity(routing, E, capacity).passes
    ref = sum(moe_ref.reference_moe(x, r, layer.w13, layer.w2) for r in passes)
    torch.testing.assert_close(out.output, ref, **F64)
    return ref, out.stats


def _cases(P):
    """(name, T, routing builder, token_splits, capacity, strategy) checked on a group of P ranks."""
    El = E // P
    cap = moe_ref.CapacityConfig
    yield "random", 45, lambda lay, x: random_routing(45, E, K, seed=1), None, None, "grouped"
    yield "router", 33, lambda lay, x: lay.route(x), None, None, "grouped"
    yield "skewed", 40, lambda lay, x: random_routing(40, E, K, skew=3.0, seed=2), None, None, "grouped"
    # every token to rank 0's experts: the other ranks receive no tokens
    yield ("hot_rank0", 21, lambda lay, x: moe_ref.Routing(
        topk_ids=torch.stack([torch.arange(21) % El, (torch.arange(21) + 1) % El], 1),  # El >= 2 here
        topk_weights=torch.full((21, K), 0.5)), None, None, "grouped")
    # ranks with no tokens of their own (first and last)
    yield ("no_own_tokens", 30, lambda lay, x: random_routing(30, E, K, skew=1.0, seed=3),
           [0] + split_tokens(30, P - 2) + [0] if P > 2 else [0, 30], None, "grouped")
    yield "empty_batch", 0, lambda lay, x: random_routing(0, E, K), None, None, "grouped"
    yield "loop_strategy", 25, lambda lay, x: lay.route(x), [25] + [0] * (P - 1), None, "loop"
    yield "padded_strategy", 25, lambda lay, x: lay.route(x), None, None, "padded"
    for ov, pol in (("drop", "position"), ("drop", "probability"), ("reroute", "position"), ("spill", "position")):
        yield (f"capacity_{ov}_{pol}", 44, lambda lay, x: moe_ref.skewed_routing(x, lay.router_weight, K, 1.5),
               [0] + split_tokens(44, P - 1), cap(capacity_factor=0.75, drop_policy=pol, overflow=ov), "grouped")


def _worker(rank, P):
    """Runs on every rank of a real gloo group; returns the names of the checks that passed."""
    done = []
    for name, T, make_routing, splits, capacity, strategy in _cases(P):
        layer, x_all = _case(T)
        r_all = make_routing(layer, x_all)
        sp = split_tokens(T, P, splits)
        lo = sum(sp[:rank])
        x = x_all[lo:lo + sp[rank]]
        r = split_routing(r_all, sp)[rank]
        w13, w2 = shard_experts(layer.w13, layer.w2, P, rank)
        out = ep_forward(x, r, w13, w2, num_experts=E, strategy=strategy, capacity=capacity)
        ref, single = _single(x_all, r_all, layer, capacity)
        torch.testing.assert_close(out.output, ref[lo:lo + sp[rank]], **F64, msg=lambda m, n=name: f"{n}: {m}")
        if single is not None:
            assert out.stats.dropped == single.dropped, (name, out.stats.dropped, single.dropped)
            assert out.stats.passes == single.passes, (name, out.stats.passes, single.passes)
            assert int(out.stats.rank_load.sum()) == single.routed - single.dropped, name
        # the simulation (same plan code, list shuffles) gives the same answer and the same traffic
        sim = simulate_ep(x_all, r_all, layer.w13, layer.w2, P, token_splits=sp, strategy=strategy,
                          capacity=capacity)
        torch.testing.assert_close(sim.rank_stats[rank].recv_rows, out.stats.recv_rows)
        assert torch.equal(sim.traffic_rows, out.stats.traffic_rows), name
        assert torch.equal(sim.output[lo:lo + sp[rank]], out.output), f"{name}: simulation differs from real run"
        if name == "hot_rank0" and rank > 0:
            assert int(out.stats.recv_rows.sum()) == 0 and int(out.stats.local_expert_load.sum()) == 0
        done.append(name)
    # the naive scheme (all-gather tokens, reduce-scatter partials) gives the same output
    layer, x_all = _case(29)
    r_all = layer.route(x_all)
    sp = split_tokens(29, P)
    lo = sum(sp[:rank])
    w13, w2 = shard_experts(layer.w13, layer.w2, P, rank)
    out = ep_forward(x_all[lo:lo + sp[rank]], split_routing(r_all, sp)[rank], w13, w2, num_experts=E,
                     scheme="naive")
    torch.testing.assert_close(out.output, _single(x_all, r_all, layer)[0][lo:lo + sp[rank]], **F64)
    done.append("naive")
    # overflow="error": the decision is global, so every rank raises the same error (no rank left waiting)
    try:
        ep_forward(x_all[lo:lo + sp[rank]], split_routing(r_all, sp)[rank], w13, w2, num_experts=E,
                   capacity=moe_ref.CapacityConfig(capacity_factor=0.3, overflow="error"))
    except ValueError as e:
        assert "capacity" in str(e), e
        done.append("error_everywhere")
    return done


EXPECTED = [c[0] for c in _cases(2)] + ["naive", "error_everywhere"]


@pytest.mark.slow  # processes: left out of make check
@pytest.mark.parametrize("P", [2, 4])
def test_real_gloo_group_matches_reference_and_simulation(P):
    t0 = time.monotonic()
    res = run_local_group(_worker, P, timeout=90, collective_timeout=30)
    bad = {r: v for r, v in res.items() if v[0] != "ok"}
    assert not bad, f"ranks failed: {bad}"
    for r, (_, done) in res.items():
        assert done == EXPECTED, f"rank {r} ran {done}"
    assert time.monotonic() - t0 < 90


def _fail_worker(rank, P):
    """Rank 1 passes a wrong expert shard and raises before any collective; the others wait in one."""
    layer, x_all = _case(12)
    r_all = layer.route(x_all)
    sp = split_tokens(12, P)
    lo = sum(sp[:rank])
    w13, w2 = shard_experts(layer.w13, layer.w2, P, rank)
    if rank == 1:
        w13, w2 = layer.w13, layer.w2  # all E experts instead of El: a clear ValueError on this rank only
    out = ep_forward(x_all[lo:lo + sp[rank]], split_routing(r_all, sp)[rank], w13, w2,
                     num_experts=E)
    return out.output.shape[0]


@pytest.mark.slow  # processes: left out of make check
def test_failure_on_one_rank_surfaces_within_timeout():
    t0 = time.monotonic()
    res = run_local_group(_fail_worker, 2, timeout=60, collective_timeout=8)
    elapsed = time.monotonic() - t0
    assert res[1][0] == "error" and "w13_local" in res[1][1] and "ValueError" in res[1][1], res[1]
    # rank 0 waits in a collective for rank 1: it fails (broken connection or collective timeout), no hang
    assert res[0][0] == "error" and ("RuntimeError" in res[0][1] or "DistError" in res[0][1]), res[0]
    assert elapsed < 45, f"group took {elapsed:.1f} s to fail"


def _stuck_worker(rank, P):
    """Rank 1 fails but its process stays alive (it never joins the collective): rank 0 must time out."""
    if rank == 1:
        time.sleep(120)
    return _fail_worker(rank, P)


@pytest.mark.slow  # processes: left out of make check
def test_stuck_rank_times_out_and_is_killed():
    t0 = time.monotonic()
    res = run_local_group(_stuck_worker, 2, timeout=12, collective_timeout=3)
    elapsed = time.monotonic() - t0
    assert res[0][0] == "error" and "timed out" in res[0][1].lower(), res[0]  # the collective timeout fired
    assert res[1][0] == "timeout", res[1]  # the launcher killed the stuck process
    assert elapsed < 22, f"took {elapsed:.1f} s"


# ----------------------------------------------------------------------------- simulation only
@settings(max_examples=examples(15))
@given(P=st.sampled_from([1, 2, 4, 8]), T=st.sampled_from([0, 1, 7, 33]), K=st.integers(1, 8),
       skew=st.sampled_from([0.0, 1.0, 4.0]), seed=st.integers(0, 50), uneven=st.booleans())
def test_simulation_matches_reference(P, T, K, skew, seed, uneven):
    K = min(K, E)
    layer, x = make_case(T, D, F, E, K, dtype=torch.float64, seed=seed)
    r = random_routing(T, E, K, skew=skew, seed=seed)
    splits = None
    if uneven:
        g = torch.Generator().manual_seed(seed)
        cut = sorted(torch.randint(0, T + 1, (P - 1,), generator=g).tolist())
        splits = [b - a for a, b in zip([0] + cut, cut + [T])]
    sim = simulate_ep(x, r, layer.w13, layer.w2, P, token_splits=splits)
    torch.testing.assert_close(sim.output, moe_ref.reference_moe(x, r, layer.w13, layer.w2), **F64)
    assert int(sim.traffic_rows.sum()) == T * K  # every assignment sent exactly once
    assert sim.rank_load.tolist() == moe_ref.expert_counts(r.topk_ids, E).view(P, -1).sum(1).tolist()
    naive = simulate_ep(x, r, layer.w13, layer.w2, P, token_splits=splits, scheme="naive")
    torch.testing.assert_close(naive.output, sim.output, **F64)
    row = D * 8
    assert naive.link_bytes("tokens") == 2 * T * (P - 1) * row  # every token to every other rank and back
    off = int(sim.traffic_rows.sum() - sim.traffic_rows.diagonal().sum())
    assert sim.link_bytes("tokens") == 2 * off * row


@pytest.mark.parametrize("overflow", ["drop", "reroute", "spill", "dropless"])
@pytest.mark.parametrize("policy", ["position", "probability"])
def test_simulated_capacity_equals_single_process(overflow, policy):
    layer, x = make_case(50, D, F, E, K, dtype=torch.float64, seed=4)
    r = moe_ref.skewed_routing(x, layer.router_weight, K, 2.0)
    cap = moe_ref.CapacityConfig(capacity_factor=0.6, drop_policy=policy, overflow=overflow)
    single = moe_ref.moe_forward(x, r, layer.w13, layer.w2, capacity=cap)
    sim = simulate_ep(x, r, layer.w13, layer.w2, 4, token_splits=[0, 10, 40, 0], capacity=cap)
    torch.testing.assert_close(sim.output, single.output, **F64)
    s0 = sim.rank_stats[0]
    assert (s0.dropped, s0.passes, s0.rerouted, s0.capacity) == (single.stats.dropped, single.stats.passes,
                                                                  single.stats.rerouted, single.stats.capacity)
    assert sum(s.dropped_own for s in sim.rank_stats) == single.stats.dropped
    if overflow in ("drop", "reroute"):
        assert single.stats.dropped > 0  # the case really exercises capacity
    # rows computed per rank never exceed El * C per pass
    if overflow != "dropless":
        assert int(sim.rank_load.max()) <= (E // 4) * single.stats.capacity * single.stats.passes


def test_simulated_error_overflow_raises_clearly():
    layer, x = make_case(20, D, F, E, K, dtype=torch.float64)
    with pytest.raises(ValueError, match="capacity"):
        simulate_ep(x, layer.route(x), layer.w13, layer.w2, 2,
                    capacity=moe_ref.CapacityConfig(capacity_factor=0.2, overflow="error"))


def test_float32_strategies_in_simulation():
    layer, x = make_case(31, D, F, E, K, dtype=torch.float32, seed=5)
    r = layer.route(x)
    ref = moe_ref.reference_moe(x.double(), r, layer.w13.double(), layer.w2.double())
    for s in ("grouped", "loop", "dense", "padded", "grouped_mm"):
        sim = simulate_ep(x, r, layer.w13, layer.w2, 2, strategy=s)
        torch.testing.assert_close(sim.output.double(), ref, **TOL[torch.float32])


def test_bad_inputs():
    layer, x = make_case(8, D, F, E, K, dtype=torch.float64)
    r = layer.route(x)
    with pytest.raises(ValueError, match="not divisible by world_size=3"):
        simulate_ep(x, r, layer.w13, layer.w2, 3)
    with pytest.raises(ValueError, match="world_size"):
        simulate_ep(x, r, layer.w13, layer.w2, 0)
    with pytest.raises(ValueError, match="token_splits"):
        simulate_ep(x, r, layer.w13, layer.w2, 2, token_splits=[3, 3])
    with pytest.raises(ValueError, match="scheme"):
        simulate_ep(x, r, layer.w13, layer.w2, 2, scheme="broadcast")
    with pytest.raises(ValueError, match="strategy"):
        simulate_ep(x, r, layer.w13, layer.w2, 2, strategy="nope")
    with pytest.raises(ValueError, match="routing has 3 tokens"):
        simulate_ep(x, moe_ref.Routing(topk_ids=r.topk_ids[:3], topk_weights=r.topk_weights[:3]),
                    layer.w13, layer.w2, 2)
    with pytest.raises(TypeError, match="capacity"):
        simulate_ep(x, r, layer.w13, layer.w2, 2, capacity=1.25)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ep_forward(x, r, layer.w13[:4], layer.w2[:4], num_experts=E)
    with pytest.raises(ValueError, match="rank must be"):
        shard_experts(layer.w13, layer.w2, 2, 2)


# ----------------------------------------------------------------------------- notebook 06 charts and panel
def test_plots_and_sweeps():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from moe_ref import experiments, plots, widgets

    before = set(plt.get_fignums())
    small = experiments.ep_layer(8, 2, d_model=16, d_ff=16)
    rows = experiments.ep_imbalance_sweep(small, [8, 64], [0.0, 2.0], world_size=4, trials=2)
    assert [(r["tokens"], r["skew"]) for r in rows] == [(8, 0.0), (64, 0.0), (8, 2.0), (64, 2.0)]
    assert all(1.0 <= r["imbalance"] <= r["imbalance_max"] <= 4.0 for r in rows)
    fig = plots.plot_ep_imbalance_sweep(rows)
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 2 + 1  # two skews and the y=1 line
    vol = experiments.comm_volume_sweep(small, tokens=40, world_sizes=(2, 4), skews=(0.0,))
    for v in vol:  # naive moves 2*T*(P-1) rows of D float32 values; dedup never exceeds grouped
        assert v["naive"] == 2 * 40 * (v["world_size"] - 1) * 16 * 4 and v["dedup"] <= v["grouped"]
    fig = plots.plot_comm_volume(vol)
    assert len(fig.axes[0].patches) == 3 * len(vol)
    sim = simulate_ep(torch.randn(20, 16), random_routing(20, 8, 2), small.w13, small.w2, 4)
    fig = plots.plot_traffic_matrix(sim.traffic_rows)
    assert fig.axes[0].images[0].get_array().shape == (4, 4)
    fig = plots.plot_rank_load(sim.rank_load, limit=12)
    assert [round(p.get_height()) for p in fig.axes[0].patches] == sim.rank_load.tolist()
    assert isinstance(widgets.ep_figure(world_size=2, tokens=32, capacity_factor=1.0), Figure)
    assert set(plt.get_fignums()) == before, "plot functions must not register pyplot figures"


def test_ep_panel_rerenders_and_shows_errors():
    from moe_ref.widgets import ep_panel

    panel = ep_panel(tokens=64)
    assert panel.renders == 1 and panel.error is None
    first = panel.figure
    panel.controls["world_size"].value = 2
    assert panel.renders == 2 and panel.figure is not first
    panel.controls["skew"].value = 3.0
    panel.controls["capacity_factor"].value = 0.5
    panel.controls["overflow"].value = "error"
    assert panel.error is not None and "capacity" in panel.error


def test_unique_destinations_counts_each_rank_once():
    r = moe_ref.Routing(topk_ids=torch.tensor([[0, 1], [0, 4], [5, 6]]), topk_weights=torch.full((3, 2), 0.5))
    from moe_ref.parallel import unique_destinations

    u = unique_destinations(r, 8, 2, token_splits=[2, 1])
    assert u.tolist() == [[2, 1], [0, 1]]  # token 0: experts 0, 1 both on rank 0 -> one row


# ----------------------------------------------------------------------------- the torchrun CLI and the package
@pytest.mark.slow
@pytest.mark.parametrize("cli_args", [
    ["--check", "--tokens", "64"],
    ["--check", "--tokens", "60", "--uneven", "--skew", "1.5", "--capacity-factor", "0.75", "--overflow", "spill",
     "--dtype", "float64"],
    ["--check", "--tokens", "40", "--scheme", "naive", "--capacity-factor", "0.5"],
])
def test_torchrun_cli_check_passes(cli_args):
    code, out = launch_torchrun(2, cli_args, timeout=150)
    assert code == 0, out[-4000:]
    assert "CHECK PASSED on all ranks" in out and out.count("check OK") == 2, out[-4000:]
    assert "traffic matrix" in out and "[rank 1/2] backend=gloo" in out, out[-4000:]
    if "spill" in cli_args:
        assert "dropped=0" in out and "passes=1" not in out, out[-4000:]  # spill: several passes, none lost


@pytest.mark.slow
def test_torchrun_cli_bad_option_fails():
    code, out = launch_torchrun(2, ["--preset", "no-such-model"], timeout=120)
    assert code != 0 and "--preset" in out and "no-such-model" in out, out[-4000:]


@pytest.mark.slow  # a fresh interpreter
def test_module_entry_point_runs_without_warnings():
    """`python -m moe_ref.parallel` (the torchrun target) imports cleanly: no runpy double-import warning."""
    res = subprocess.run([sys.executable, "-W", "error", "-m", "moe_ref.parallel", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--check" in res.stdout and "--preset" in res.stdout and "Warning" not in res.stderr


@pytest.mark.parametrize("argv, why", [
    (["--tokens", "-5"], "--tokens must be >= 0, got -5"), (["--skew", "nan"], "--skew must be >= 0, got nan"),
    (["--timeout", "0"], "--timeout must be > 0, got 0.0"),
    (["--capacity-factor", "-1"], "--capacity-factor must be > 0, got -1.0"),
])
def test_cli_refuses_bad_settings_before_any_process_group(argv, why, capsys):
    from moe_ref.parallel.cli import main

    with pytest.raises(SystemExit) as exc:  # in this plain process: no torchrun, no group to join
        main(argv)
    assert exc.value.code == 2 and why in capsys.readouterr().err


def test_cli_helpers():
    from moe_ref.parallel.cli import PRESETS, _uneven_splits
    from moe_ref.parallel.report import fmt_bytes

    for T, P in ((256, 4), (7, 3), (5, 1), (0, 2)):
        s = _uneven_splits(T, P)
        assert len(s) == P and sum(s) == T and all(v >= 0 for v in s), (T, P, s)
        if P > 1:
            assert s[0] == 0 and s == sorted(s), s
    assert [fmt_bytes(n) for n in (0, 1023, 2048, 3 * 2 ** 20)] == ["0 B", "1023 B", "2.0 KiB", "3.0 MiB"]
    for D, F, E, K in PRESETS.values():
        assert moe_ref.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K).top_k == K


def test_transport_rejects_unknown_requests_and_schemes():
    def prog():
        yield "broadcast"

    with pytest.raises(TypeError, match="unknown collective request str"):
        run_with_torch_distributed(prog())
    with pytest.raises(ValueError, match="scheme must be one of"):
        get_scheme("broadcast")
    assert get_scheme("naive") is not get_scheme("grouped")


def test_simulated_transport_catches_diverging_ranks():
    from moe_ref.parallel.simulate import _run_lockstep

    def short():
        yield AllGather(torch.zeros(1, 2))
        return "done"

    def long():
        yield AllGather(torch.zeros(1, 2))
        yield AllGather(torch.zeros(1, 2))
        return "done"

    with pytest.raises(RuntimeError, match="ranks diverged"):
        _run_lockstep([short(), long()])
    done, meters = _run_lockstep([short(), short()])
    assert done == ["done", "done"] and meters["meta"].tolist() == [[8, 8], [8, 8]]  # 2 float32 to each rank
