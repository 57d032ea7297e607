"""The plotting functions of notebooks 01-05 (moe_ref.plots) and their panels (moe_ref.widgets).

Plot functions are pure: tiny inputs in, a matplotlib Figure out, with the axes and artists the data implies,
and nothing left in pyplot's global figure list. Panels: constructing one renders a chart; changing a control
re-renders a different chart; a setting the library rejects shows the library's message instead.
"""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import moe_ref
from moe_ref import plots, widgets


@pytest.fixture(autouse=True)
def _no_global_figures():
    before = set(plt.get_fignums())
    yield
    leaked = set(plt.get_fignums()) - before
    plt.close("all")
    assert not leaked, f"plot functions must not register pyplot figures, got {leaked}"


def _bars(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    return buf.getvalue()


def _small_case(T=10, E=4, K=2, skew=0.0, seed=0):
    r = moe_ref.random_routing(T, E, K, skew=skew, seed=seed)
    return r, moe_ref.group_by_expert(r.topk_ids, E)


# ---------------------------------------------------------------- 01 naive


def test_plot_expert_load_bars_mean_and_capacity():
    fig = plots.plot_expert_load(torch.tensor([3, 0, 5, 2]), capacity=4)
    (ax,) = fig.axes
    assert [b.get_height() for b in _bars(ax)] == [3, 0, 5, 2]
    ys = sorted(float(line.get_ydata()[0]) for line in ax.get_lines())
    assert ys == [2.5, 4.0]  # mean of the loads and the capacity line
    assert "2.00" in ax.get_title()  # max/mean = 5 / 2.5


def test_plot_router_choices_boxes_every_choice():
    r = moe_ref.random_routing(5, 6, 2, seed=1)
    fig = plots.plot_router_choices(r.probs(), r.topk_ids)
    ax = fig.axes[0]
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 5 * 2
    assert {(round(b.get_x() + 0.5), round(b.get_y() + 0.5)) for b in boxes} == {
        (e, t) for t in range(5) for e in r.topk_ids[t].tolist()}
    assert len(fig.axes) == 2  # heatmap + colorbar


def test_plot_naive_work_counts_dense_waste():
    counts = torch.tensor([4, 1, 3, 0])
    fig = plots.plot_naive_work(counts, num_tokens=4, top_k=2)
    ax, bx = fig.axes
    assert [b.get_height() for b in _bars(ax)] == [4, 1, 3, 0]
    heights = sorted(b.get_height() for b in _bars(bx))
    assert heights == [8, 8, 16 - 8]  # useful T*K twice, dense waste T*E - T*K
    assert "50%" in bx.get_title() and "2.0x" in bx.get_title()


def test_plot_strategy_times_ratios():
    fig = plots.plot_strategy_times({"gemm_only": 0.002, "dense": 0.008})
    ax = fig.axes[0]
    assert len(_bars(ax)) == 2
    labels = [t.get_text() for t in ax.texts]
    assert any("4.0x bound" in t for t in labels) and any("1.0x bound" in t for t in labels)


# ---------------------------------------------------------------- 02 batching


def test_plot_batching_timeline_one_box_per_batch():
    cfg = moe_ref.MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2)
    sim = moe_ref.simulate_dynamic_batching(cfg, arrival_rate=200.0, num_requests=12, max_batch_tokens=16,
                                            max_wait=0.002, request_len=(1, 8))
    fig = plots.plot_batching_timeline(sim)
    ax, bx = fig.axes
    assert len(_bars(ax)) == len(sim.batches)
    assert [b.get_height() for b in _bars(ax)] == [b["num_tokens"] for b in sim.batches]
    assert [round(b.get_height(), 9) for b in _bars(bx)] == [round(b["load_imbalance"], 9) for b in sim.batches]


def test_plot_latency_throughput_lines_per_max_tokens():
    rows = [dict(max_batch_tokens=m, max_wait=w, p50_latency_s=0.001 * (1 + w), p99_latency_s=0.002 * (1 + w),
                 throughput_tokens_per_s=100.0 * m) for m in (8, 32) for w in (0.0, 0.01)]
    fig = plots.plot_latency_throughput(rows)
    ax, bx = fig.axes
    assert len(ax.get_lines()) == 4 and len(bx.get_lines()) == 2  # p99 + p50 per setting; throughput per setting
    assert sorted(line.get_ydata()[0] for line in bx.get_lines()) == [800.0, 3200.0]


def test_plot_imbalance_vs_batch_median_and_worst():
    fig = plots.plot_imbalance_vs_batch({4: [1.0, 2.0, 3.0], 16: [1.1, 1.2, 1.5]})
    ax = fig.axes[0]
    by_label = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert by_label["median batch"] == [2.0, 1.2]
    assert by_label["worst batch seen"] == [3.0, 1.5]


# ---------------------------------------------------------------- 03 grouping


def test_plot_grouping_before_after_and_offsets():
    r, plan = _small_case(T=6, E=3, K=2)
    fig = plots.plot_grouping(r.topk_ids, plan)
    ax, hx, bx = fig.axes
    assert len(_bars(ax)) == 12 and len(_bars(bx)) == 12
    assert [b.get_height() for b in _bars(hx)] == plan.counts.tolist()
    # after grouping the strip's colours change only at expert boundaries: E runs at most
    colors = [tuple(b.get_facecolor()) for b in _bars(bx)]
    runs = 1 + sum(a != b for a, b in zip(colors, colors[1:]))
    assert runs == int((plan.counts > 0).sum())


def test_plot_sort_times_one_line_per_method():
    fig = plots.plot_sort_times([8, 64], {"argsort": [1e-4, 2e-4], "counting": [2e-4, 3e-4]})
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["argsort", "counting"]


# ---------------------------------------------------------------- 04 permutation


def test_plot_token_flow_draws_every_row_twice():
    r, plan = _small_case(T=5, E=3, K=2)
    fig = plots.plot_token_flow(r.topk_ids, r.topk_weights, plan)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2 * plan.num_rows  # permute line + combine line per grouped row
    blocks = [p for p in ax.patches if type(p) is Rectangle]
    assert len(blocks) == int((plan.counts > 0).sum())  # one block per non-empty expert
    assert sorted(round(b.get_height() + 0.1) for b in blocks) == sorted(c for c in plan.counts.tolist() if c)


def test_plot_stage_times_marks_overhead():
    times = {"route": 1e-3, "group": 1e-3, "permute": 1e-3, "expert FFNs (contiguous blocks)": 6e-3,
             "unpermute + combine": 1e-3}
    fig = plots.plot_stage_times(times)
    ax = fig.axes[0]
    assert len(_bars(ax)) == 5
    assert "30%" in ax.get_title()  # 3 overhead ms of 10


# ---------------------------------------------------------------- 05 capacity


def test_plot_capacity_load_kept_and_overflow():
    fig = plots.plot_capacity_load([5, 1, 2], [3, 1, 2], capacity=3)
    ax = fig.axes[0]
    bars = _bars(ax)
    assert [b.get_height() for b in bars[:3]] == [3, 1, 2]
    assert [b.get_height() for b in bars[3:]] == [2, 0, 0]


def test_plot_capacity_sweep_series_and_overflow_comparison():
    rows = [dict(skew=s, capacity_factor=cf, drop_share=0.1 * s / cf, rel_error=0.2 * s / cf)
            for s in (0.0, 1.0) for cf in (1.0, 2.0)]
    fig = plots.plot_capacity_sweep(rows, series="skew")
    ax, bx = fig.axes
    assert len(ax.get_lines()) == 2 and len(bx.get_lines()) == 2
    assert list(bx.get_lines()[1].get_ydata()) == [0.2, 0.1]
    cmp_rows = [dict(overflow="drop", error=None, rel_error=0.5, computed_rows=10, padded_slots=2, passes=1,
                     seconds=1e-3),
                dict(overflow="error", error="expert 0 has load 9 > capacity 4", rel_error=float("nan"),
                     computed_rows=0, padded_slots=0, passes=0, seconds=float("nan"))]
    fig = plots.plot_overflow_comparison(cmp_rows)
    assert len(fig.axes) == 3
    assert any("raised" in t.get_text() for t in fig.axes[0].texts)


# ---------------------------------------------------------------- panels


SLOW = pytest.mark.slow  # the fast tier re-renders one panel; make test all of them
PANELS = [
    (lambda: widgets.naive_panel(), "tokens", 70),
    pytest.param(lambda: widgets.batching_panel(num_requests=20), "max_batch_tokens", 64, marks=SLOW),
    pytest.param(lambda: widgets.grouping_panel(), "tokens", 9, marks=SLOW),
    pytest.param(lambda: widgets.token_flow_panel(), "seed", 3, marks=SLOW),
    pytest.param(lambda: widgets.capacity_panel(tokens=64), "capacity_factor", 0.5, marks=SLOW),
    pytest.param(lambda: widgets.ep_panel(tokens=64), "world_size", 2, marks=SLOW),
    pytest.param(lambda: widgets.alignment_panel(), "block_m", 8, marks=SLOW),
]


def _shown_png(panel) -> bytes:
    """The PNG the panel's Output widget holds: what JupyterLab (or an executed notebook) shows."""
    import base64

    outs = panel.output.outputs
    assert len(outs) == 1 and outs[0]["output_type"] == "display_data", f"expected one chart, got {outs}"
    return base64.b64decode(outs[0]["data"]["image/png"])


@pytest.mark.parametrize("make, control, value", PANELS, ids=["naive", "batching", "grouping", "permutation",
                                                               "capacity", "parallel", "alignment"])
def test_panel_renders_and_rerenders_on_change(make, control, value):
    import ipywidgets as W

    panel = make()
    assert isinstance(panel, W.Widget)
    assert panel.renders == 1 and isinstance(panel.figure, Figure) and panel.error is None
    before, png_before = panel.figure, _png(panel.figure)
    shown_before = _shown_png(panel)
    assert shown_before.startswith(b"\x89PNG")
    panel.controls[control].value = value
    assert panel.renders == 2, f"changing {control} did not re-render"
    assert panel.figure is not before and _png(panel.figure) != png_before, f"{control} did not change the chart"
    assert _shown_png(panel) != shown_before, f"{control} changed the figure but not what the Output shows"


def test_capacity_panel_shows_the_error_message():
    panel = widgets.capacity_panel(tokens=64)
    panel.controls["skew"].value = 3.0
    panel.controls["capacity_factor"].value = 0.5
    panel.controls["overflow"].value = "error"
    assert panel.error is not None and "over capacity" in panel.error and "expert" in panel.error
    shown = panel.output.outputs
    assert len(shown) == 1 and shown[0]["output_type"] == "stream" and panel.error in shown[0]["text"]
    panel.controls["overflow"].value = "spill"
    assert panel.error is None and isinstance(panel.figure, Figure)
    assert _shown_png(panel).startswith(b"\x89PNG")
