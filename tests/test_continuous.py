"""moe_ref.batching.continuous: conservation, the budget, the schedulers' defining behaviour, errors.

Legend: T tokens in a step, P_i / O_i prompt / output tokens of request i, B token budget, E experts, K top-k.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import moe_ref
from moe_ref.batching import draw_workload, serving_comparison, simulate_serving
from moe_ref.costmodel import DeviceProfile

CFG = moe_ref.MoEConfig(d_model=256, d_ff=128, num_experts=16, top_k=2)
FAST = DeviceProfile("test", bandwidth_bps=1e11, peak_flops=1e13, step_overhead_s=1e-5)


def _check_conservation(sim, budget):
    total_prompt = sum(r["prompt_len"] for r in sim.requests)
    total_out = sum(r["output_len"] for r in sim.requests)
    for r in sim.requests:  # every request finishes with exactly its tokens
        assert r["prefilled"] == r["prompt_len"] and r["generated"] == r["output_len"] == len(r["token_times"])
        assert r["arrival"] <= r["first_token"] <= r["finish"] == r["token_times"][-1]
        assert r["token_times"] == sorted(r["token_times"])
    assert all(s["tokens"] <= budget for s in sim.steps)  # no step exceeds the budget
    assert sum(s["prefill_tokens"] for s in sim.steps) == total_prompt
    assert sum(s["decode_tokens"] for s in sim.steps) == total_out - len(sim.requests)
    assert all(s["end"] > s["start"] for s in sim.steps)
    assert all(a["end"] <= b["start"] + 1e-12 for a, b in zip(sim.steps, sim.steps[1:]))  # one server
    assert len(sim.ttft_s) == len(sim.requests) and min(sim.ttft_s) > 0


@given(n=st.integers(1, 12), rate=st.floats(1.0, 1e4), budget=st.integers(1, 96),
       chunk=st.one_of(st.none(), st.integers(1, 64)), plo=st.integers(1, 24), pspan=st.integers(0, 24),
       out=st.integers(1, 9), E=st.sampled_from([1, 4, 16]), seed=st.integers(0, 50),
       mode=st.sampled_from(["continuous", "request"]), dense=st.booleans())
def test_conservation_and_budget(n, rate, budget, chunk, plo, pspan, out, E, seed, mode, dense):
    cfg = moe_ref.MoEConfig(d_model=32, d_ff=16, num_experts=E, top_k=min(2, E))
    kw = dict(mode=mode, num_requests=n, arrival_rate=rate, prompt_len=(plo, plo + pspan), output_len=(1, out),
              token_budget=budget, chunk_size=chunk, profile=FAST, dense=dense, seed=seed)
    longest = max(draw_workload(n, rate, (plo, plo + pspan), (1, out), seed)["prompt_len"])
    if (mode == "request" or chunk is None) and longest > budget:
        with pytest.raises(ValueError, match="cannot hold the longest prompt"):
            simulate_serving(cfg, **kw)
        return
    sim = simulate_serving(cfg, **kw)
    _check_conservation(sim, budget)
    assert all(s["hit"] <= (1 if dense else E) for s in sim.steps)


def test_continuous_steps_mix_decodes_and_chunks():
    sim = simulate_serving(CFG, num_requests=30, arrival_rate=2000.0, prompt_len=(40, 80), output_len=(5, 20),
                           token_budget=64, chunk_size=16, profile=FAST)
    _check_conservation(sim, 64)
    assert any(s["decode_tokens"] and s["prefill_tokens"] for s in sim.steps)  # mixed steps exist
    assert max(s["prefill_tokens"] for s in sim.steps) <= 64
    # a chunk is at most chunk_size tokens of one prompt: a prompt of >= 40 tokens needs >= 3 steps
    assert sim.metrics["max_step_tokens"] <= 64


def test_request_level_holds_the_batch_until_its_longest_output():
    sim = simulate_serving(CFG, mode="request", num_requests=20, arrival_rate=5000.0, prompt_len=8,
                           output_len=(1, 30), token_budget=64, profile=FAST)
    _check_conservation(sim, 64)
    prefills = [s for s in sim.steps if s["prefill_tokens"]]
    assert all(s["decode_tokens"] == 0 for s in prefills)  # prefill steps never carry decodes
    assert all(s["prefill_tokens"] == 0 for s in sim.steps if s["decode_tokens"])


def test_continuous_beats_request_level_and_dense_reads_fewer_bytes():
    rows = serving_comparison(CFG, num_requests=40, arrival_rate=3000.0, prompt_len=(8, 32), output_len=(8, 64),
                              token_budget=128, chunk_size=32, profile=FAST)
    by = {(r["mode"], r["model"]): r for r in rows}
    assert by["continuous", "moe"]["throughput_tokens_per_s"] > by["request", "moe"]["throughput_tokens_per_s"]
    assert by["continuous", "moe"]["ttft_p99_s"] < by["request", "moe"]["ttft_p99_s"]
    # same active parameters, but the MoE touches many experts per step: more weight bytes per token
    assert by["continuous", "moe"]["weight_bytes_per_token"] > by["continuous", "dense"]["weight_bytes_per_token"]
    assert by["continuous", "dense"]["mean_hit_per_step"] == 1.0


def test_same_seed_same_run_and_the_workload_is_shared():
    a = simulate_serving(CFG, num_requests=10, profile=FAST, seed=3)
    b = simulate_serving(CFG, num_requests=10, profile=FAST, seed=3)
    c = simulate_serving(CFG, mode="request", num_requests=10, profile=FAST, seed=3)
    assert a.metrics == b.metrics and a.steps == b.steps
    assert [r["arrival"] for r in a.requests] == [r["arrival"] for r in c.requests]
    assert [r["output_len"] for r in a.requests] == [r["output_len"] for r in c.requests]


@pytest.mark.parametrize("kw, match", [
    (dict(mode="static"), "mode must be one of"),
    (dict(token_budget=0), "token_budget must be >= 1"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(max_running=1000, token_budget=64), "max_running must be <= 64"),
    (dict(arrival_rate=0.0), "arrival_rate must be > 0"),
    (dict(prompt_len=(5, 2)), "prompt_len / output_len"),
    (dict(output_len=0), "request_len must be >= 1"),
    (dict(profile="H200"), "profile must be"),
    (dict(num_layers=0), "num_layers must be >= 1"),
    (dict(token_budget=16, chunk_size=None, prompt_len=32), "cannot hold the longest prompt"),
])
def test_bad_input_is_refused(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        simulate_serving(CFG, **{"num_requests": 5, **kw})


def test_bad_cfg_and_comparison_arguments():
    with pytest.raises(TypeError, match="cfg must be"):
        simulate_serving(dict(d_model=1))
    with pytest.raises(ValueError, match="sets mode and dense itself"):
        serving_comparison(CFG, mode="request")


def test_serving_plots_draw_from_simulations():
    from moe_ref import costmodel, plots

    sims = {f"chunk={c}": simulate_serving(CFG, num_requests=8, chunk_size=c, profile=FAST) for c in (None, 32)}
    rows = serving_comparison(CFG, num_requests=8, profile=FAST)
    Ts = [1, 4, 16, 64]
    figs = [plots.plot_chunked_prefill(sims), plots.plot_serving_comparison(rows),
            plots.plot_experts_touched([dict(tokens=T, hit=costmodel.expected_step_cost(CFG, T)["hit"]) for T in Ts]),
            plots.plot_cost_knee([costmodel.expected_step_cost(CFG, T) for T in Ts],
                                 [costmodel.expected_step_cost(costmodel.dense_equivalent(CFG), T) for T in Ts],
                                 {"MoE": costmodel.knee_tokens(CFG)}),
            plots.plot_serving_steps({"run": [dict(step=0, tokens=3, decode_seqs=1, prefill_tokens=2, hit_mean=2.0,
                                                   dropped=1)]})]
    assert all(f.axes for f in figs)


@pytest.mark.slow
def test_serving_panel_renders_and_rerenders():
    from moe_ref import widgets

    panel = widgets.serving_panel(num_requests=8)
    assert panel.renders == 1 and panel.error is None and panel.output.outputs
    panel.controls["experts"].value = 16
    assert panel.renders == 2 and panel.figure is not None
