"""Exercises of notebook 08 (choosing a strategy): the α–β time of an all-to-all, a layer's time, the EP degree.

Legend: T tokens per step, D d_model, F d_ff, E experts, K top-k, P ranks = N nodes × L ranks per node (the EP
degree), El = E / P; α a link's latency (s), β its bandwidth (bytes/s per rank and per direction).
Each check_* compares the reader's function with moe_ref's own: `all_to_all_time` (moe_ref/parallel/topology.py)
and `layer_timeline` with `micro_batch_loads` (moe_ref/parallel/timeline.py), the numbers moe_ref.advise ranks
its options by.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..parallel import Topology, all_to_all_time, topology_preset
from ..parallel.timeline import layer_timeline, micro_batch_loads
from ..roofline import MODEL_SHAPES
from ..router import Routing
from ..skew import random_routing
from ._cases import routing
from ._runner import Case, CheckResult, run_check
from .parallel import traffic_rows

__all__ = ["check_all_to_all_time", "check_layer_time", "check_ep_degree"]

_QWEN = {s.name: s for s in MODEL_SHAPES}["qwen3-30b-a3b"]  # D 2048, F 768, E 128, K 8


def _layouts() -> list[tuple[str, Topology]]:
    return [
        ("2 nodes x 2 ranks, NVLink + IB", topology_preset("h200-2nodes", nodes=2, ranks_per_node=2)),
        ("one 4-GPU NVLink node", topology_preset("h200-node", ranks_per_node=4)),
        ("one rank per node: all IB", topology_preset("h200-2nodes", nodes=4, ranks_per_node=1)),
        ("PCIe node of 3", topology_preset("pcie-node", ranks_per_node=3)),
        ("a single GPU", topology_preset("single-gpu")),
        ("no latency: bytes / β only", replace(topology_preset("h200-2nodes", nodes=2, ranks_per_node=2),
                                               intra_latency_s=0.0, inter_latency_s=0.0)),
        ("3 nodes x 2 ranks", topology_preset("h200-4nodes", nodes=3, ranks_per_node=2)),
    ]


def check_all_to_all_time(fn, verbose: bool = True) -> CheckResult:
    """fn(traffic [P, P] float64 bytes, topo: Topology) -> seconds: one all-to-all on the α–β model.

    topo has nodes, ranks_per_node (rank r on node r // L), intra_bps, inter_bps, intra_latency_s,
    inter_latency_s. Per rank p and link class c (inside a node, between nodes), its sends take
    α_c + (bytes p sends over c) / β_c, its receives α_c + (bytes p receives over c) / β_c, 0 when nothing moves.
    They all run at once; the all-to-all ends with the slowest rank's slowest one. The diagonal uses no link.
    """
    cases = []
    for i, (name, topo) in enumerate(_layouts()):
        P = topo.world_size
        E = 4 * P
        traffic = (traffic_rows(routing(8 * P, E, 2, "hot" if i == 3 else "random", seed=i).topk_ids, E, P)
                   * 4096).double()  # [P, P] bytes: rows of D = 2048 in bf16
        cases.append(Case(name, dict(traffic=traffic, topo=topo), all_to_all_time(traffic, topo),
                          rtol=1e-9, atol=1e-15))
    topo = topology_preset("h200-2nodes", nodes=2, ranks_per_node=2)
    one = torch.zeros(4, 4, dtype=torch.float64)
    one[0, 3] = 1e6  # 1 MB to one peer on the other node: α + 1e6 / 50e9
    diag = torch.diag(torch.full((4,), 1e9, dtype=torch.float64))
    cases += [Case("one message across nodes", dict(traffic=one, topo=topo), all_to_all_time(one, topo),
                   rtol=1e-9, atol=1e-15),
              Case("nothing moves (T=0)", dict(traffic=torch.zeros(4, 4, dtype=torch.float64), topo=topo), 0.0),
              Case("diagonal only: local copies", dict(traffic=diag, topo=topo), all_to_all_time(diag, topo))]
    return run_check("check_all_to_all_time", fn, cases, verbose=verbose,
                     hint="node = arange(P) // L; per class mask the matrix, .sum(1) is sent and .sum(0) received; "
                          "where(b > 0, α + b / β, 0); the max over everything.")


def _loads(ids: torch.Tensor, E: int, P: int) -> dict:
    return micro_batch_loads(Routing(topk_ids=ids, topk_weights=torch.ones(ids.shape)), E, P, 1)[0]


def check_layer_time(fn, verbose: bool = True) -> CheckResult:
    """fn(traffic_rows [P, P], rows [P], hit [P], topo, d_model, d_ff) -> seconds: one MoE layer, no overlap.

    Dispatch (the all-to-all of traffic_rows · row bytes, a row = d_model bf16 values, 2 bytes each), then every
    rank computes its rows, then the combine (the all-to-all of the transpose). Rank p's expert time is the
    roofline bound max(bytes / 4.3e12, FLOPs / 790e12) (moe_ref.roofline's H200 figures) with
    FLOPs = 6·D·F·rows and bytes = hit·3·D·F·2 + rows·(2·D + 2·F)·2 (its hit experts' weights, then x, y and
    the SwiGLU rows); 0 rows take 0 s. The layer takes dispatch + the slowest rank's compute + combine.
    """
    cases = []
    D, F, E, K = _QWEN.d_model, _QWEN.d_ff, _QWEN.num_experts, _QWEN.top_k
    grid = [("decode: T=64, 2 nodes x 2", 64, 0.5, "h200-2nodes", 2, 2),
            ("prefill: T=2048, one node of 8", 2048, 0.5, "h200-node", 1, 8),
            ("T=0 (an empty step)", 0, 0.0, "h200-node", 1, 4),
            ("a single GPU: no all-to-all", 256, 0.0, "single-gpu", 1, 1),
            ("skewed router: one slow rank", 512, 2.0, "h200-node", 1, 4),
            ("T=1", 1, 0.0, "h200-2nodes", 2, 4),
            ("PCIe node of 2", 96, 1.0, "pcie-node", 1, 2)]
    for i, (name, T, skew, preset, N, L) in enumerate(grid):
        topo = topology_preset(preset, nodes=N, ranks_per_node=L)
        ld = _loads(random_routing(T, E, K, skew=skew, seed=i).topk_ids, E, topo.world_size)
        cases.append(Case(name, dict(traffic_rows=ld["traffic_rows"], rows=ld["rows"], hit=ld["hit"], topo=topo,
                                     d_model=D, d_ff=F),
                          layer_timeline([ld], topo, D, F)["total_s"], rtol=1e-9, atol=1e-15))
    return run_check("check_layer_time", fn, cases, verbose=verbose,
                     hint="reuse your all-to-all time on traffic_rows * 2 * d_model and on its .t(); add the max "
                          "over ranks of the roofline time of (rows[p], hit[p]).")


def _ep_case(name: str, T: int, skew: float, degrees: dict, seed: int) -> Case:
    D, F, E, K = _QWEN.d_model, _QWEN.d_ff, _QWEN.num_experts, _QWEN.top_k
    ids = random_routing(T, E, K, skew=skew, seed=seed).topk_ids
    times = {P: layer_timeline([_loads(ids, E, P)], topo, D, F)["total_s"] for P, topo in degrees.items()}
    best = min(times, key=lambda P: (times[P], P))
    return Case(name, dict(topk_ids=ids, num_experts=E, d_model=D, d_ff=F, topologies=dict(degrees)), int(best))


def check_ep_degree(fn, verbose: bool = True) -> CheckResult:
    """fn(topk_ids [T, K], num_experts, d_model, d_ff, topologies: dict[P, Topology]) -> the best EP degree P.

    For every candidate P (its Topology has world_size P), rank p owns experts [p·El, (p+1)·El) and the p-th
    near-even contiguous chunk of tokens (split_tokens); count its traffic row, its rows and its hit local experts
    (experts with at least one row), and price the layer as check_layer_time does. Return the P of the least
    layer time; a tie goes to the smaller P.
    """
    node = {P: topology_preset("single-gpu" if P == 1 else "h200-node", ranks_per_node=P) for P in (1, 2, 4, 8)}
    span = {8: topology_preset("h200-node"), 16: topology_preset("h200-2nodes"),
            32: topology_preset("h200-4nodes")}
    cases = [_ep_case("decode T=64 on one node: P in 1, 2, 4, 8", 64, 0.5, node, 0),
             _ep_case("prefill T=2048 on one node", 2048, 0.5, node, 1),
             _ep_case("T=0: every degree ties at 0 s, the smallest wins", 0, 0.0, node, 2),
             _ep_case("T=1", 1, 0.0, node, 3),
             _ep_case("one candidate only", 128, 0.0, {4: node[4]}, 4),
             _ep_case("across nodes: 8, 16 or 32 ranks, T=512", 512, 0.5, span, 5),
             _ep_case("skew 2: a hot expert on one rank", 2048, 2.0, node, 6)]
    return run_check("check_ep_degree", fn, cases, verbose=verbose,
                     hint="per P: bincount(ids // El) per rank's tokens gives the traffic row; per-expert counts "
                          ".view(P, El) give rows (sum) and hit (> 0 count); then min over (time, P).")
