"""The experiment drivers behind notebooks 02-05 (moe_ref.experiments): rows with the numbers the charts need.

The expert-parallel sweeps (ep_layer, ep_imbalance_sweep, comm_volume_sweep) are tested with the simulation
they drive, in tests/test_parallel.py.
"""

from __future__ import annotations

import time

import pytest
import torch

import moe_ref
from moe_ref import experiments, widgets
from moe_ref.batching import simulate_dynamic_batching


def test_mean_seconds_times_the_call():
    calls = []

    def nap():
        calls.append(1)
        time.sleep(0.01)

    sec = experiments.mean_seconds(nap, reps=3)
    assert 0.01 <= sec < 1.0
    assert len(calls) == 3 + 2  # torch.utils.benchmark's warm-up runs first


def test_batching_sweep_rows_are_the_simulations():
    cfg = moe_ref.MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2)
    kw = dict(arrival_rate=100.0, num_requests=10)
    rows = experiments.batching_sweep(cfg, [0.0, 0.01], [8, 64], **kw)
    assert [(r["max_batch_tokens"], r["max_wait"]) for r in rows] == [(8, 0.0), (8, 0.01), (64, 0.0), (64, 0.01)]
    s = simulate_dynamic_batching(cfg, max_batch_tokens=64, max_wait=0.01, **kw)
    assert rows[3]["p99_latency_s"] == s.p99_latency_s and rows[3]["batches"] == len(s.batches)
    assert rows[3]["mean_load_imbalance"] == s.mean_load_imbalance


def test_imbalance_samples_are_max_over_mean_loads():
    s = experiments.imbalance_samples([4, 64], 4, 2, trials=3)
    assert list(s) == [4, 64] and all(len(v) == 3 and 1.0 <= min(v) and max(v) <= 4.0 for v in s.values())
    r = moe_ref.random_routing(64, 4, 2, seed=64)  # trial 0 of T=64
    counts = moe_ref.expert_counts(r.topk_ids, 4).double()
    assert s[64][0] == pytest.approx(float(counts.max() / counts.mean()))


def test_sort_times_one_series_per_method():
    t = experiments.sort_times([8, 16], 4, 2, reps=1)
    assert set(t) == {"argsort", "counting"} and all(len(v) == 2 and min(v) > 0 for v in t.values())


def test_stage_times_keys_in_pipeline_order():
    layer = moe_ref.MoELayer(moe_ref.MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2), dtype=torch.float64)
    x = torch.randn(9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    times = experiments.stage_times(layer, x, reps=1)
    assert list(times) == ["route", "group", "permute", "expert FFNs (contiguous blocks)", "unpermute + combine"]
    assert all(t > 0 for t in times.values())


def test_overflow_comparison_against_dropless():
    layer = moe_ref.MoELayer(moe_ref.MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2), seed=0)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    r = moe_ref.skewed_routing(x, layer.router_weight, 2, skew=2.0)
    rows = {row["overflow"]: row for row in experiments.overflow_comparison(layer, x, r, 1.0, reps=1)}
    assert set(rows) == {"drop", "reroute", "spill", "dropless", "error"}
    assert "capacity" in rows["error"]["error"] and rows["error"]["output"] is None
    assert rows["spill"]["rel_error"] < 1e-6 and rows["dropless"]["rel_error"] == 0.0
    assert rows["drop"]["dropped"] > 0 and rows["drop"]["rel_error"] > 0
    assert rows["spill"]["passes"] > 1 and rows["drop"]["seconds"] > 0


def test_widgets_hold_panels_only():
    moved = {"batching_sweep", "imbalance_samples", "sort_times", "stage_times", "overflow_comparison", "ep_layer",
             "ep_imbalance_sweep", "comm_volume_sweep", "walkthrough", "expert_blocks"}
    assert not moved & set(dir(widgets))
    assert all(n.endswith(("_panel", "_figure")) for n in widgets.__all__), widgets.__all__
