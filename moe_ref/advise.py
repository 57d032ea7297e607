"""Choosing a strategy: a ranked table of MoE-layer options for a workload on a topology, with reasons.

Legend: T tokens per step, D d_model, F d_ff, E experts, K top-k, C capacity per expert, P ranks = N nodes ×
L ranks per node (EP degree), M max nodes per token, R redundant expert slots.

Every number in a row comes from this package's simulator, time model or roofline, on one seeded routing
of T tokens (moe_ref.skew.random_routing with the workload's skew):
  - rows per rank and the traffic matrix: counted from the routing (micro_batch_loads: the rows the plan
    sends) or metered by simulate_ep (hierarchical, node-limited);
  - all-to-all time: the α–β model on the topology's documented link figures (moe_ref.parallel.topology);
  - expert compute: the roofline lower bound per rank (moe_ref.roofline's H200 figures), bf16;
  - drops of a capacity: moe_ref.apply_capacity on the same routing.
The layer time is a model (a lower bound for compute plus spec-bandwidth links), not a measurement; it
ranks options against each other. Options that break the workload's requirement (a latency-sensitive
workload tolerates no dropped assignment; a throughput-oriented one at most 1 %) rank last, ok=False.
Weights are assumed to fit (a single GPU holds all E experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capacity import apply_capacity
from .config import CapacityConfig
from .parallel import Topology, inter_node_bytes, layer_comm_time, simulate_ep, topology_preset
from .parallel.replicate import load_ratio, physical_routing, replicate_experts
from .parallel.timeline import expert_time, layer_timeline, micro_batch_loads
from .roofline import MODEL_SHAPES, ExpertShape
from .router import node_limited_routing
from .skew import random_routing
from .stats import expert_counts
from .validate import check_instance, check_int, check_number

__all__ = ["Workload", "WORKLOADS", "DEPLOYMENTS", "advise", "advice_grid", "advice_cells", "advice_table",
           "format_advice", "option_sweep"]

_SHAPES = {s.name: s for s in MODEL_SHAPES}


@dataclass(frozen=True)
class Workload:
    """What is served: tokens per step (decode: one per running sequence; prefill: prompt tokens), how
    skewed the router is, the expert shape, and whether latency matters (no drops then)."""

    name: str
    tokens_per_step: int
    latency_sensitive: bool
    skew: float = 0.5
    shape: ExpertShape = field(default_factory=lambda: _SHAPES["qwen3-30b-a3b"])
    capacity_factor: float = 1.25

    def __post_init__(self):
        check_int("tokens_per_step", self.tokens_per_step, 1)
        check_number("skew", self.skew, 0)
        check_number("capacity_factor", self.capacity_factor, 0, strict=True)
        check_instance("shape", self.shape, ExpertShape)

    @property
    def max_drop_share(self) -> float:
        return 0.0 if self.latency_sensitive else 0.01


WORKLOADS = {
    "latency-sensitive": Workload("latency-sensitive decode (64 sequences, one token each per step)", 64, True),
    "throughput-oriented": Workload("throughput-oriented prefill (16384 prompt tokens per step)", 16384, False),
}
DEPLOYMENTS = {"single GPU": "single-gpu", "one multi-GPU node": "h200-node", "multi-node": "h200-4nodes"}


def _row(option, ep, total_s, comm_s, compute_s, imbalance, ok, reason, **extra) -> dict:
    return dict(option=option, ep_degree=ep, layer_us=total_s * 1e6, comm_us=comm_s * 1e6,
                compute_us=compute_s * 1e6, imbalance=imbalance, ok=ok, reason=reason, **extra)


def _hier_bytes(routing, E: int, topo: Topology, row_bytes: int) -> torch.Tensor:
    """[P, P] dispatch bytes of the hierarchical scheme, metered by simulate_ep (rows of 4 values, rescaled)."""
    P, T = topo.world_size, routing.num_tokens
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 4, generator=g)
    w13, w2 = torch.randn(E, 2, 4, generator=g), torch.randn(E, 4, 1, generator=g)
    sim = simulate_ep(x, routing, w13, w2, P, scheme="hierarchical", ranks_per_node=topo.ranks_per_node)
    return sim.traffic_rows.double() * row_bytes


def _flat(routing, E, topo, s, el, micro_batches=1):
    loads = micro_batch_loads(routing, E, topo.world_size, micro_batches)
    tl = layer_timeline(loads, topo, s.d_model, s.d_ff, el)
    rows = sum(ld["rows"] for ld in loads)
    return tl, load_ratio(rows), sum(ld["traffic_rows"] for ld in loads)


def advise(workload: Workload, topology: Topology | str, seed: int = 0) -> list[dict]:
    """Ranked options (best first) for `workload` on `topology` (a Topology or a preset name).

    Row: rank, option, ep_degree, layer_us (modeled MoE-layer time), comm_us, compute_us, tokens_per_s,
    imbalance (max/mean rows per rank), drop_share, inter_node_mib, ok, reason (the numbers behind it).
    """
    check_instance("workload", workload, Workload)
    topo = topology_preset(topology) if isinstance(topology, str) else check_instance("topology", topology, Topology)
    s, T = workload.shape, workload.tokens_per_step
    E, K, D = s.num_experts, s.top_k, s.d_model
    P, N, L = topo.world_size, topo.nodes, topo.ranks_per_node
    if E % P:
        raise ValueError(f"num_experts={E} of {s.name} is not divisible by the topology's {P} ranks")
    el, row_bytes = 2, s.d_model * 2  # bf16 rows
    r = random_routing(T, E, K, skew=workload.skew, seed=seed)
    rows = []

    base, imb, traffic = _flat(r, E, topo, s, el)
    inter = inter_node_bytes(traffic * row_bytes, topo) * 2 / 2**20
    where = "one GPU, no all-to-all" if P == 1 else f"flat all-to-all over {P} ranks ({base['comm_s'] * 1e6:.1f} µs)"
    rows.append(_row("grouped, dropless", P, base["total_s"], base["comm_s"], base["compute_s"], imb, True,
                     f"{where}; slowest rank's experts {base['compute_s'] * 1e6:.1f} µs (rows max/mean {imb:.2f})",
                     drop_share=0.0, inter_node_mib=inter))

    cap = apply_capacity(r, E, CapacityConfig(capacity_factor=workload.capacity_factor, overflow="drop"))
    kept = cap.passes[0]
    drop = cap.dropped / (T * K)
    El = E // P
    pad_compute = expert_time(El * cap.capacity, El, D, s.d_ff, el)  # static [El, C] buffers on every rank
    pl, _, ptraffic = _flat(kept, E, topo, s, el)
    ok = drop <= workload.max_drop_share
    rows.append(_row(f"padded, capacity factor {workload.capacity_factor:g}", P, pl["comm_s"] + pad_compute,
                     pl["comm_s"], pad_compute, 1.0, ok,
                     f"C={cap.capacity}: drops {drop:.1%} of assignments (measured on this routing"
                     f"{'; allowed' if ok else '; too many for this workload'}); static buffers of El*C="
                     f"{El * cap.capacity} rows per rank", drop_share=drop,
                     inter_node_mib=inter_node_bytes(ptraffic * row_bytes, topo) * 2 / 2**20))

    if P == 1:
        dense = expert_time(T * E, E, D, s.d_ff, el)
        rows.append(_row("dense (every expert on every token)", 1, dense, 0.0, dense, 1.0, True,
                         f"computes E/K = {E / K:.0f}x the rows; {dense * 1e6:.1f} µs vs grouped "
                         f"{base['total_s'] * 1e6:.1f} µs", drop_share=0.0, inter_node_mib=0.0))
    if P > 1:
        ov, _, _ = _flat(r, E, topo, s, el, micro_batches=2)
        verdict = "hides compute under the all-to-all" if ov["total_s"] < base["total_s"] else \
            "twice the latencies and weight reads cost more than it hides"
        rows.append(_row("grouped + two-micro-batch overlap", P, ov["total_s"], ov["comm_s"], ov["compute_s"], imb,
                         True, f"{ov['total_s'] * 1e6:.1f} vs {base['total_s'] * 1e6:.1f} µs without: {verdict}",
                         drop_share=0.0, inter_node_mib=inter))
        observed = random_routing(max(T, 4096), E, K, skew=workload.skew, seed=seed + 1)  # recent steps' loads
        plan = replicate_experts(expert_counts(observed.topk_ids, E), P, P)
        rep, rimb, rtraffic = _flat(physical_routing(r, plan), E + P, topo, s, el)
        rows.append(_row(f"grouped + {P} redundant experts", P, rep["total_s"], rep["comm_s"], rep["compute_s"], rimb,
                         True, f"rows max/mean {imb:.2f} -> {rimb:.2f} (copies planned on another batch); "
                               f"{rep['total_s'] * 1e6:.1f} µs", drop_share=0.0,
                         inter_node_mib=inter_node_bytes(rtraffic * row_bytes, topo) * 2 / 2**20))
    if N > 1:
        hb = _hier_bytes(r, E, topo, row_bytes)
        hc = layer_comm_time(hb, topo, hierarchical=True)
        hi = inter_node_bytes(hb, topo) * 2 / 2**20
        rows.append(_row("hierarchical all-to-all", P, hc + base["compute_s"], hc, base["compute_s"], imb, True,
                         f"inter-node bytes {hi:.1f} vs flat {inter:.1f} MiB, in two sequential steps "
                         f"({hc * 1e6:.1f} vs {base['comm_s'] * 1e6:.1f} µs)", drop_share=0.0, inter_node_mib=hi))
        M = max(1, N // 2)
        nl = node_limited_routing(r.logits, K, num_nodes=N, max_nodes=M)
        nb = _hier_bytes(nl, E, topo, row_bytes)
        nc = layer_comm_time(nb, topo, hierarchical=True)
        nlb, nimb, _ = _flat(nl, E, topo, s, el)
        changed = float((nl.topk_ids.sort(-1).values != r.topk_ids.sort(-1).values).any(-1).double().mean())
        ni = inter_node_bytes(nb, topo) * 2 / 2**20
        rows.append(_row(f"node-limited (M={M}) + hierarchical", P, nc + nlb["compute_s"], nc, nlb["compute_s"], nimb,
                         True, f"inter-node {ni:.1f} vs {hi:.1f} MiB unrestricted; changes the experts of "
                               f"{changed:.0%} of tokens (a quality cost: see notebook 06b)", drop_share=0.0,
                         inter_node_mib=ni, changed_share=changed))
        per_node = random_routing(max(1, T // N), E, K, skew=workload.skew, seed=seed)
        node_topo = topo.with_nodes(1)
        if E % L == 0:
            dp, dimb, _ = _flat(per_node, E, node_topo, s, el)
            rows.append(_row(f"EP inside each node only (EP={L}, nodes split the batch)", L, dp["total_s"],
                             dp["comm_s"], dp["compute_s"], dimb, True,
                             f"{max(1, T // N)} tokens per node, no inter-node traffic; every node holds all "
                             f"{E} experts", drop_share=0.0, inter_node_mib=0.0))
    rows.sort(key=lambda rw: (not rw["ok"], rw["layer_us"]))
    for i, rw in enumerate(rows, 1):
        rw["rank"] = i
        rw["tokens_per_s"] = T / (rw["layer_us"] * 1e-6) if rw["layer_us"] else float("inf")
    return rows


def advice_grid(workloads=None, deployments=None, skew: float | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """{"<workload> / <deployment>": advise rows} for every workload × deployment (defaults: the 2 × 3 grid)."""
    workloads = WORKLOADS if workloads is None else workloads
    deployments = DEPLOYMENTS if deployments is None else deployments
    out = {}
    for wname, w in workloads.items():
        if skew is not None:
            w = Workload(w.name, w.tokens_per_step, w.latency_sensitive, skew, w.shape, w.capacity_factor)
        for dname, topo in deployments.items():
            out[f"{wname} / {dname}"] = advise(w, topo, seed)
    return out


def advice_cells(tokens: int, skew: float, topology: str) -> dict[str, list[dict]]:
    """The two workload kinds at `tokens` per step and `skew` on one topology preset (for strategy_panel)."""
    return {f"{kind}, T={tokens}, {topology}": advise(Workload(kind, tokens, kind == "latency-sensitive", skew),
                                                      topology)
            for kind in ("latency-sensitive", "throughput-oriented")}


def advice_table(grid: dict[str, list[dict]]) -> list[dict]:
    """One row per cell: the best option, its number, the runner-up, and why."""
    out = []
    for cell, rows in grid.items():
        best, second = rows[0], rows[1] if len(rows) > 1 else None
        out.append(dict(cell=cell, best=best["option"], ep_degree=best["ep_degree"], layer_us=best["layer_us"],
                        runner_up=second["option"] if second else "",
                        runner_up_us=second["layer_us"] if second else None,
                        reason=best["reason"]))
    return out


def option_sweep(workload: Workload, topology, tokens=None, skews=None, seed: int = 0) -> list[dict]:
    """advise rows over tokens per step (or over skews), flattened: tokens, skew, option, layer_us, ok, rank."""
    if (tokens is None) == (skews is None):
        raise ValueError("option_sweep needs exactly one of tokens= or skews=")
    out = []
    for v in (tokens if tokens is not None else skews):
        T, sk = (v, workload.skew) if tokens is not None else (workload.tokens_per_step, v)
        w = Workload(workload.name, T, workload.latency_sensitive, sk, workload.shape, workload.capacity_factor)
        for r in advise(w, topology, seed):
            out.append(dict(tokens=T, skew=sk, option=r["option"], layer_us=r["layer_us"], ok=r["ok"], rank=r["rank"]))
    return out


def format_advice(rows: list[dict]) -> str:
    """A markdown table of advise rows."""
    out = ["| # | option | EP | µs/layer | tokens/s | max/mean | drops | inter-node MiB | ok | reason |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['rank']} | {r['option']} | {r['ep_degree']} | {r['layer_us']:.1f} | "
                   f"{r['tokens_per_s']:.3g} | "
                   f"{r['imbalance']:.2f} | {r['drop_share']:.1%} | {r['inter_node_mib']:.1f} | "
                   f"{'yes' if r['ok'] else 'no'} | {r['reason']} |")
    return "\n".join(out)
