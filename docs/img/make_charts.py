"""Regenerate the one-chart-per-notebook PNGs in docs/img/ with the same plot functions the notebooks use.

Run from the repository root: `.venv/bin/python docs/img/make_charts.py` (about a minute on a 2-core CPU), or
name the charts to redraw: `.venv/bin/python docs/img/make_charts.py 04_permutation 07_triton_kernels`.
Sizes match the notebooks' full (non-smoke) parameters; everything here is deterministic (seeded), no timings.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import moe_ref
from moe_ref.experiments import DEFAULT_COST, batching_sweep
from moe_ref.grouped import grouped_steps
from moe_ref.plots import plot_capacity_sweep, plot_grouping, plot_latency_throughput, plot_naive_work, plot_token_flow

OUT = Path(__file__).resolve().parent
D, F, E, K = 256, 512, 8, 2


def _layer():
    return moe_ref.MoELayer(moe_ref.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K), seed=0)


def _x():
    return torch.randn(2048, D, generator=torch.Generator().manual_seed(1))


def naive():
    r = _layer().route(_x()[:64])  # a 64-token batch: the irregular expert batches of "loop"
    return plot_naive_work(moe_ref.expert_counts(r.topk_ids, E), 64, K)


def dynamic_batching():
    sim_cfg = moe_ref.MoEConfig(d_model=1024, d_ff=2048, num_experts=E, top_k=K)
    rows = batching_sweep(sim_cfg, [0.0, 0.001, 0.002, 0.005, 0.01, 0.02], [32, 128, 512, 2048],
                          arrival_rate=1000.0, num_requests=600, **DEFAULT_COST)
    return plot_latency_throughput(rows, title="dynamic batching, simulated: 1000 requests/s "
                                               "(cost model: 2 ms per forward + FLOPs at 1 TFLOP/s)")


def token_grouping():
    r10 = _layer().route(_x()[:10])
    return plot_grouping(r10.topk_ids, moe_ref.group_by_expert(r10.topk_ids, E),
                         title="10 tokens, E=8, K=2: before and after group_by_expert")


def permutation():
    tiny = moe_ref.MoELayer(moe_ref.MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2), seed=0)
    xt = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    rt = tiny.route(xt)
    plan = grouped_steps(xt, rt, tiny.w13, tiny.w2).plan
    return plot_token_flow(rt.topk_ids, rt.topk_weights, plan)


def capacity():
    table = moe_ref.capacity_quality_table(_layer(), _x()[:1024], [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0],
                                           [0.0, 0.5, 1.0, 2.0], overflows=("drop",))
    return plot_capacity_sweep(table, series="skew",
                               title="capacity: drop share and output error vs capacity factor (T=1024, E=8, K=2)")


def expert_parallelism():
    from moe_ref.widgets import ep_figure  # one simulated forward on 4 virtual ranks (moe_ref.parallel)

    return ep_figure(world_size=4, tokens=256, skew=1.0, capacity_factor=0.0, experts=8, top_k=2, seed=0)


def triton_kernels():
    from moe_ref.widgets import alignment_figure  # the torch reference of align_block_size: no GPU needed

    return alignment_figure(T=32, E=8, K=2, block_m=4, skew=1.0, seed=0)


CHARTS = {
    "01_naive_batching": naive,
    "02_dynamic_batching": dynamic_batching,
    "03_token_grouping": token_grouping,
    "04_permutation": permutation,
    "05_capacity_and_overflow": capacity,
    "06_expert_parallelism": expert_parallelism,
    "07_triton_kernels": triton_kernels,
}


def main(names: list[str] | None = None) -> None:
    unknown = sorted(set(names or []) - set(CHARTS))
    if unknown:
        raise SystemExit(f"unknown charts {unknown}; choose from {sorted(CHARTS)}")
    for name in names or list(CHARTS):
        with torch.inference_mode():
            fig = CHARTS[name]()
        path = OUT / f"{name}.png"
        fig.savefig(path, dpi=110)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
