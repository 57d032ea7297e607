"""Regenerate the one-chart-per-notebook PNGs in docs/img/ with the same plot functions the notebooks use.

Run from the repository root: `.venv/bin/python docs/img/make_charts.py` (about a minute on a 2-core CPU).
Sizes match the notebooks' full (non-smoke) parameters; everything here is deterministic (seeded), no timings.
"""

from __future__ import annotations

from pathlib import Path

import torch

import moe_ref
from moe_ref.experiments import DEFAULT_COST, batching_sweep
from moe_ref.grouped import grouped_steps
from moe_ref.plots import plot_capacity_sweep, plot_grouping, plot_latency_throughput, plot_naive_work, plot_token_flow

OUT = Path(__file__).resolve().parent


def main() -> None:
    D, F, E, K = 256, 512, 8, 2
    layer = moe_ref.MoELayer(moe_ref.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K), seed=0)
    charts = {}
    with torch.inference_mode():
        x = torch.randn(2048, D, generator=torch.Generator().manual_seed(1))
        r = layer.route(x[:64])  # a 64-token batch: the irregular expert batches of "loop"
        charts["01_naive_batching"] = plot_naive_work(moe_ref.expert_counts(r.topk_ids, E), 64, K)

        sim_cfg = moe_ref.MoEConfig(d_model=1024, d_ff=2048, num_experts=E, top_k=K)
        rows = batching_sweep(sim_cfg, [0.0, 0.001, 0.002, 0.005, 0.01, 0.02], [32, 128, 512, 2048],
                              arrival_rate=1000.0, num_requests=600, **DEFAULT_COST)
        charts["02_dynamic_batching"] = plot_latency_throughput(
            rows, title="dynamic batching, simulated: 1000 requests/s "
                        "(cost model: 2 ms per forward + FLOPs at 1 TFLOP/s)")

        r10 = layer.route(x[:10])
        charts["03_token_grouping"] = plot_grouping(r10.topk_ids, moe_ref.group_by_expert(r10.topk_ids, E),
                                                    title="10 tokens, E=8, K=2: before and after group_by_expert")

        tiny = moe_ref.MoELayer(moe_ref.MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2), seed=0)
        xt = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
        rt = tiny.route(xt)
        plan = grouped_steps(xt, rt, tiny.w13, tiny.w2).plan
        charts["04_permutation"] = plot_token_flow(rt.topk_ids, rt.topk_weights, plan)

        table = moe_ref.capacity_quality_table(layer, x[:1024], [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0],
                                               [0.0, 0.5, 1.0, 2.0], overflows=("drop",))
        charts["05_capacity_and_overflow"] = plot_capacity_sweep(
            table, series="skew", title="capacity: drop share and output error vs capacity factor (T=1024, E=8, K=2)")
    for name, fig in charts.items():
        path = OUT / f"{name}.png"
        fig.savefig(path, dpi=110)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
