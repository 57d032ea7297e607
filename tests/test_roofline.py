"""The roofline prediction (moe_ref.roofline) against hand-computed values and a Monte Carlo of top-K routing,
and its chart (moe_ref.plots.plot_roofline), including the overlay of timings (fake rows here, not measurements)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.figure import Figure

import moe_ref
from moe_ref import roofline as rl
from moe_ref.plots import plot_roofline

TINY = rl.ExpertShape("tiny", d_model=4, d_ff=8, num_experts=4, top_k=2)
QWEN3 = rl.MODEL_SHAPES[1]


def test_hand_computed_small_case():
    p = rl.roofline_point(TINY, 3, hit=3, elem_bytes=2, hbm_bps=1e3, matmul_flops=1e4)
    assert p["flops"] == 6 * 4 * 8 * 3 * 2 == 1152
    assert p["weight_bytes"] == 3 * (3 * 4 * 8) * 2 == 576  # 3 experts x (w13 [16, 4] + w2 [4, 8]) x 2 B
    # x + y: 2 x [3, 4] x 2 B = 48; SwiGLU output [6, 8] written + read: 192; ids + weights [3, 2]: 6 x 12 = 72
    assert p["activation_bytes"] == 48 + 192 + 72 == 312
    assert p["hbm_us"] == pytest.approx(888 / 1e3 * 1e6)
    assert p["matmul_us"] == pytest.approx(1152 / 1e4 * 1e6)
    assert p["bound_us"] == p["hbm_us"] and p["binds"] == "hbm"
    assert p["weight_share"] == pytest.approx(576 / 888)
    assert p["tflops"] == pytest.approx(1152 / 0.888 / 1e12)
    fused = rl.roofline_point(TINY, 3, hit=3, hbm_bps=1e3, matmul_flops=1e4, intermediate=False)
    assert fused["activation_bytes"] == 312 - 192


def test_one_token_touches_exactly_k_experts():
    for s in rl.MODEL_SHAPES:
        assert rl.expected_hit(1, s.num_experts, s.top_k) == pytest.approx(s.top_k, rel=1e-12)
        p = rl.roofline_point(s, 1)
        assert p["hit"] == pytest.approx(s.top_k)
        assert p["weight_bytes"] == pytest.approx(s.top_k * 3 * s.d_model * s.d_ff * 2)
        assert p["binds"] == "hbm"  # decode streams weights: the tensor cores are ~180x faster than needed
        assert p["matmul_us"] < p["hbm_us"] / 100
    # Qwen3-30B-A3B, T=1: 8 experts x 3 x 2048 x 768 x 2 B = 75,497,472 B plus 32,864 B of activations
    assert rl.roofline_point(QWEN3, 1)["bound_us"] == pytest.approx((75_497_472 + 32_864) / 4.3e12 * 1e6)


def test_explicit_hit_replaces_the_expected_count():
    uniform = rl.roofline_point(QWEN3, 16)
    assert 8 < uniform["hit"] < 128
    skewed = rl.roofline_point(QWEN3, 16, hit=20)  # a skewed routing touches fewer experts
    assert skewed["hit"] == 20 and skewed["weight_bytes"] == 20 * 3 * 2048 * 768 * 2
    assert skewed["bound_us"] < uniform["bound_us"]
    assert rl.roofline_point(QWEN3, 16, hit=uniform["hit"])["bound_us"] == pytest.approx(uniform["bound_us"])


def test_empty_batch_costs_nothing():
    p = rl.roofline_point(QWEN3, 0)
    assert p["bound_us"] == 0 and p["binds"] == "none" and p["hit"] == 0


def test_the_limit_switches_once_at_the_crossover():
    for s in rl.MODEL_SHAPES:
        t_star = rl.crossover_tokens(s)
        assert 1 < t_star < 16384
        binds = [r["binds"] for r in rl.roofline_table([s], range(1, 20000, 97))]
        first = binds.index("matmul")
        assert set(binds[:first]) == {"hbm"} and set(binds[first:]) == {"matmul"}  # switches once, never back
        assert rl.roofline_point(s, math.floor(t_star))["binds"] == "hbm"
        assert rl.roofline_point(s, math.ceil(t_star))["binds"] == "matmul"


def test_mixtral_crossover_matches_the_closed_form():
    """Past a few dozen tokens all 8 experts are hit, so T* solves E*3DF*2/B + T*act/B = 6DFK*T/P."""
    s = rl.MODEL_SHAPES[0]
    D, F, E, K = s.d_model, s.d_ff, s.num_experts, s.top_k
    act_per_token = 2 * D * 2 + 2 * K * F * 2 + K * 12
    closed = (E * 3 * D * F * 2 / 4.3e12) / (6 * D * F * K / 790e12 - act_per_token / 4.3e12)
    assert rl.crossover_tokens(s) == pytest.approx(closed, rel=1e-9)
    assert 700 < closed < 800


def test_device_figures_are_overridable():
    s = rl.MODEL_SHAPES[0]
    base = rl.crossover_tokens(s)
    assert rl.crossover_tokens(s, matmul_flops=2 * rl.H200_BF16_FLOPS) > base  # faster tensor cores: later
    assert rl.crossover_tokens(s, hbm_bps=2 * rl.H200_HBM_BPS) < base  # faster memory: earlier
    assert rl.crossover_tokens(s, hbm_bps=1e30) == 1.0  # matmul binds from the first token
    assert rl.crossover_tokens(s, matmul_flops=1e30) == math.inf  # never
    fast = rl.roofline_point(s, 1, hbm_bps=8.6e12)
    assert fast["hbm_us"] == pytest.approx(rl.roofline_point(s, 1)["hbm_us"] / 2)


@given(E=st.integers(1, 16), k_frac=st.floats(0, 1), T=st.integers(0, 12), seed=st.integers(0, 2**31 - 1))
def test_expected_hit_matches_monte_carlo_of_topk_routing(E, k_frac, T, seed):
    K = 1 + round(k_frac * (E - 1))
    n = 4000
    logits = torch.rand(n, T, E, generator=torch.Generator().manual_seed(seed))  # [n, T, E]
    ids = logits.topk(K, dim=-1).indices.reshape(n, -1)  # [n, T*K] K distinct experts per token
    hit = torch.zeros(n, E, dtype=torch.bool).scatter_(1, ids, True).sum(1).double()  # [n] distinct experts hit
    expected = rl.expected_hit(T, E, K)
    # spread of the count, exactly: q = P(an expert is missed), r = P(two given experts are both missed)
    q = (1 - K / E) ** T
    r = ((E - K) * (E - K - 1) / (E * (E - 1))) ** T if E > 1 else 0.0
    var = E * q * (1 - q) + E * (E - 1) * (r - q * q)
    se = math.sqrt(max(var, 0.0) / n)
    assert abs(hit.mean().item() - expected) <= 5 * se + 1e-9, (hit.mean().item(), expected, se)


def test_expected_hit_is_not_the_with_replacement_formula():
    # with replacement it would be E*(1-(1-1/E)^(T*K)): fewer experts, since a token cannot repeat one
    assert rl.expected_hit(4, 8, 4) == pytest.approx(8 * (1 - 0.5**4))
    assert rl.expected_hit(4, 8, 4) > 8 * (1 - (7 / 8) ** 16)
    assert rl.expected_hit(3, 5, 5) == 5.0


def test_shapes_are_duck_typed():
    ns = SimpleNamespace(name="mine", d_model=2048, d_ff=768, num_experts=128, top_k=8)
    cfg = moe_ref.MoEConfig(d_model=2048, d_ff=768, num_experts=128, top_k=8)
    a, b, c = (rl.roofline_point(x, 64) for x in (QWEN3, ns, cfg))
    assert a["bound_us"] == b["bound_us"] == c["bound_us"]
    assert b["shape"] == "mine" and c["shape"] == "D2048-F768-E128-K8"


def test_model_shapes_match_the_benchmark_presets():
    bench = pytest.importorskip("moe_ref.bench")
    presets = {(s.name, s.d_model, s.d_ff, s.num_experts, s.top_k) for s in bench.SHAPES.values()}
    mine = {(s.name, s.d_model, s.d_ff, s.num_experts, s.top_k) for s in rl.MODEL_SHAPES}
    assert mine <= presets


@pytest.mark.parametrize("call, exc, name", [
    (lambda: rl.roofline_point(QWEN3, -1), ValueError, "num_tokens"),
    (lambda: rl.roofline_point(QWEN3, 2.5), TypeError, "num_tokens"),
    (lambda: rl.expected_hit(-1, 8, 2), ValueError, "num_tokens"),
    (lambda: rl.expected_hit(4, 8, 9), ValueError, "top_k"),
    (lambda: rl.ExpertShape("x", 64, 128, 4, 5), ValueError, "top_k"),
    (lambda: rl.ExpertShape("x", 0, 128, 4, 2), ValueError, "d_model"),
    (lambda: rl.roofline_point(QWEN3, 4, hit=129), ValueError, "hit"),
    (lambda: rl.roofline_point(QWEN3, 4, hit=33), ValueError, "hit"),  # > T*K
    (lambda: rl.roofline_point(QWEN3, 4, hit=7), ValueError, "hit"),  # < K
    (lambda: rl.roofline_point(QWEN3, 0, hit=1), ValueError, "hit"),
    (lambda: rl.weight_bytes(QWEN3, 200), ValueError, "hit"),
    (lambda: rl.roofline_point(QWEN3, 4, hbm_bps=0), ValueError, "hbm_bps"),
    (lambda: rl.roofline_point(QWEN3, 4, matmul_flops=-1.0), ValueError, "matmul_flops"),
    (lambda: rl.roofline_point(QWEN3, 4, elem_bytes=0), ValueError, "elem_bytes"),
    (lambda: rl.roofline_point(SimpleNamespace(d_model=4, d_ff=8), 4), TypeError, "num_experts"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_markdown_table_and_cli(capsys):
    text = rl.markdown_table(rl.roofline_table())
    lines = text.splitlines()
    assert lines[0] == "| T | mixtral-8x7b | qwen3-30b-a3b | olmoe-1b-7b | deepseek-v3-routed |"
    assert len(lines) == 2 + len(rl.TOKEN_COUNTS)
    assert lines[2].startswith("| 1 | 163.9 (hbm) | 17.6 (hbm) |")
    assert "(matmul)" in lines[-1] and "(hbm)" not in lines[-1]
    rl.main()
    out = capsys.readouterr().out
    assert text in out and "mixtral-8x7b: crossover T* = 761" in out


# the chart


@pytest.fixture(autouse=True)
def _no_global_figures():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before, "plot functions must not register pyplot figures"


def _line(ax, label):
    return next(ln for ln in ax.get_lines() if ln.get_label() == label)


def test_plot_shows_bound_limits_and_binding_markers():
    rows = rl.roofline_table()
    fig = plot_roofline(rows)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * len(rl.MODEL_SHAPES)
    assert "prediction" in fig._suptitle.get_text().lower()
    top = fig.axes[0]  # mixtral, time panel
    mix = [r for r in rows if r["shape"] == "mixtral-8x7b"]
    assert list(_line(top, "lower bound (max of the two)").get_ydata()) == [r["bound_us"] for r in mix]
    assert _line(top, "HBM limit: bytes / bandwidth").get_linestyle() == "--"
    assert _line(top, "matmul limit: FLOPs / rate").get_linestyle() == "--"
    hbm, mm = top.collections[:2]
    assert len(hbm.get_offsets()) == sum(r["binds"] == "hbm" for r in mix)
    assert len(mm.get_offsets()) == sum(r["binds"] == "matmul" for r in mix)
    assert top.get_xscale() == top.get_yscale() == "log"
    assert any("T* ≈ 761" in t.get_text() for t in top.texts)
    rate = fig.axes[len(rl.MODEL_SHAPES)]  # mixtral, TFLOP/s panel
    assert list(_line(rate, "best useful TFLOP/s at the bound").get_ydata()) == [r["tflops"] for r in mix]


def test_plot_overlays_timings_rows_fake_data():
    """Fake rows, shaped like a device sweep's, only to check where the overlay lands."""
    rows = rl.roofline_table()
    fake = [dict(shape="qwen3-30b-a3b", tokens=t, provider="fake_provider", ms=0.01 * t) for t in (1, 64, 4096)]
    fake += [dict(shape="qwen3-30b-a3b", tokens=16, provider="fake_provider", median_ms=0.2, status="ok"),
             dict(shape="qwen3-30b-a3b", tokens=256, provider="fake_provider", median_ms=None, status="skipped")]
    fig = plot_roofline(rows, measured=fake)
    top, rate = fig.axes[1], fig.axes[len(rl.MODEL_SHAPES) + 1]  # qwen3's two panels
    line = _line(top, "fake_provider")
    assert list(line.get_xdata()) == [1, 16, 64, 4096]  # sorted by T, the skipped row left out
    assert list(line.get_ydata()) == pytest.approx([10.0, 200.0, 640.0, 40960.0])  # ms -> µs
    tf = list(_line(rate, "fake_provider").get_ydata())
    assert tf[0] == pytest.approx(6 * 2048 * 768 * 8 / 1e-5 / 1e12)
    assert top.get_legend() is not None
    assert not any(ln.get_label() == "fake_provider" for ln in fig.axes[0].get_lines())  # other shapes untouched


def test_plot_rejects_bad_rows():
    rows = rl.roofline_table()
    with pytest.raises(ValueError, match="rows"):
        plot_roofline([])
    with pytest.raises(ValueError, match="no-such-shape"):
        plot_roofline(rows, measured=[dict(shape="no-such-shape", tokens=1, provider="p", ms=1.0)])
    with pytest.raises(ValueError, match="ms"):
        plot_roofline(rows, measured=[dict(shape="qwen3-30b-a3b", tokens=1, provider="p")])


def test_results_page_shows_the_current_prediction():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    assert rl.markdown_table(rl.roofline_table()) in text, "regenerate the table: python -m moe_ref.roofline"
    assert "img/roofline_h200.png" in text and "not a measurement" in text
