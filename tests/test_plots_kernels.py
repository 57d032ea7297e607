"""The kernel pictures (moe_ref.plots.kernels) and the alignment panel's pure function, on hand-built plans."""

from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch

from moe_ref.plots import padded_rows, plot_alignment, plot_gather_tile, plot_padding_waste


def hand_plan():
    """T=3, K=2 (S=6 slots, sentinel 6), E=3, BLOCK_M=2. Expert 0 gets slots 0, 2, 4 (3 rows -> 2 blocks, 1 pad),
    expert 2 gets slots 1, 3, 5 (2 blocks, 1 pad); expert 1 none. One unused block at the end."""
    sorted_ids = torch.tensor([0, 2, 4, 6, 1, 3, 5, 6, 6, 6], dtype=torch.int32)
    expert_ids = torch.tensor([0, 0, 2, 2, -1], dtype=torch.int32)
    return SimpleNamespace(sorted_slot_ids=sorted_ids, expert_ids=expert_ids,
                           num_padded=torch.tensor([8], dtype=torch.int32), block_m=2, num_tokens=3, top_k=2)


def test_padded_rows():
    assert padded_rows(torch.tensor([3, 0, 3]), 2) == 8
    assert padded_rows(torch.tensor([1, 1, 1, 1]), 16) == 64
    assert padded_rows(torch.tensor([0, 0]), 4) == 0
    assert padded_rows(torch.tensor([32]), 16) == 32


@pytest.fixture(autouse=True)
def _no_global_figures():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before, "plot functions must not register pyplot figures"


def test_plot_alignment_counts_cells_and_padding():
    fig = plot_alignment(hand_plan(), num_experts=3)
    grid, bars = fig.axes[0], fig.axes[1]
    assert len(grid.patches) == 4 * 2  # the 4 used blocks x BLOCK_M cells (unused block not drawn)
    texts = [t.get_text() for t in grid.texts]
    assert texts.count("pad") == 2
    assert {"0.0", "1.0", "2.0", "0.1", "1.1", "2.1"} <= set(texts)  # slot s shown as token.choice
    assert [t.get_text() for t in grid.get_yticklabels()] == [f"block {b} → e{e}" for b, e in enumerate([0, 0, 2, 2])]
    assert "6 slots -> 8 rows (25% padding)" in bars.get_title()
    real = [p.get_width() for p in bars.patches[:3]]
    assert real == [3, 0, 3]
    plt.close(fig)


def test_plot_gather_tile_and_errors():
    plan = hand_plan()
    fig = plot_gather_tile(plan, block=2, num_experts=3)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "slot 1 = t0.k1" in labels and "slot 3 = t1.k1" in labels
    assert any("expert 2" in s for s in labels)
    plt.close(fig)
    with pytest.raises(ValueError, match="block must be in"):
        plot_gather_tile(plan, block=4)


def test_plot_padding_waste_lines():
    counts = {1: torch.tensor([1, 1, 0, 0]), 64: torch.tensor([32, 32, 32, 32])}
    fig = plot_padding_waste(counts, block_ms=(16, 32))
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["BLOCK_M=16", "BLOCK_M=32"]
    assert list(lines[0].get_ydata()) == pytest.approx([1 - 2 / 32, 0.0])
    assert list(lines[1].get_ydata()) == pytest.approx([1 - 2 / 64, 0.0])
    plt.close(fig)


def test_alignment_figure_with_given_align_fn():
    from moe_ref.widgets import alignment_figure

    calls = []

    def fake_align(ids, E, block_m):
        calls.append((tuple(ids.shape), E, block_m))
        return hand_plan()

    fig = alignment_figure(T=3, E=3, K=2, block_m=2, skew=0.0, align_fn=fake_align)
    assert calls == [((3, 2), 3, 2)]
    plt.close(fig)
