"""Chart labels that a reader must be able to read: no overlapping gate weights, no undefined legend symbols."""

from __future__ import annotations

import itertools

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from moe_ref import plots
from moe_ref.widgets import token_flow_figure


def _drawn(fig):
    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


@pytest.mark.parametrize("tokens, experts, top_k", [(6, 4, 2)] + [pytest.param(*c, marks=pytest.mark.slow)
                                                      for c in [(12, 8, 4), (12, 3, 3), (1, 1, 1)]])
def test_token_flow_weight_labels_do_not_overlap(tokens, experts, top_k):
    fig = token_flow_figure(tokens=tokens, experts=experts, top_k=top_k, skew=1.0)
    renderer = _drawn(fig)
    labels = [t for t in fig.axes[0].texts if t.get_text().startswith("w") and "=" in t.get_text()]
    assert len(labels) == tokens * top_k  # one per (token, choice)
    boxes = [t.get_window_extent(renderer) for t in labels]
    clashes = [(a.get_text(), b.get_text()) for (a, ba), (b, bb) in itertools.combinations(zip(labels, boxes), 2)
               if ba.overlaps(bb)]
    assert not clashes, f"overlapping weight labels: {clashes[:4]}"


def test_rank_load_legend_says_what_the_bound_is():
    fig = plots.plot_rank_load([10, 12, 9, 11], limit=12)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("(E/P)·C = 12" in t for t in legend), legend
    fig = plots.plot_rank_load([10, 24, 9, 11], limit=24, passes=2)
    assert any("(E/P)·C·passes = 24" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
