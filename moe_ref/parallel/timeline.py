"""A simulated per-rank timeline of one MoE layer: all-to-all on the time model, expert compute on the roofline.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, P ranks, El = E / P; m micro-batches.

Each rank has two lanes: "comm" (its all-to-all sends and receives, one collective at a time, in issue
order) and "compute" (its local experts). A collective starts when every rank has issued it (the inputs
are ready on all ranks and the comm lane is free); rank p is busy for its own α–β time
(moe_ref.parallel.topology) and the collective ends with its slowest rank. Expert compute on rank p lasts
the roofline lower bound of its rows (moe_ref.roofline's H200 figures by default): max(bytes / HBM
bandwidth, FLOPs / matmul rate) with bytes = hit experts' weights + rows' activations.

m = 1 is the plain layer (dispatch, compute, combine). m = 2 is moe_ref.parallel.overlap's order: both
dispatches, then per micro-batch: compute, combine, so micro-batch 1's dispatch runs during micro-batch
0's compute, and micro-batch 0's combine during micro-batch 1's compute. The rows each micro-batch moves
are counted from the routing (the rows the plan sends: the same counts simulate_ep meters).
"""

from __future__ import annotations

import torch

from ..roofline import H200_BF16_FLOPS, H200_HBM_BPS
from ..router import Routing
from ..validate import check_int
from .overlap import micro_batch_splits
from .split import split_tokens
from .topology import Topology, all_to_all_time

__all__ = ["expert_time", "micro_batch_loads", "layer_timeline"]


def expert_time(rows: int, hit: int, d_model: int, d_ff: int, elem_bytes: int = 2, hbm_bps: float = H200_HBM_BPS,
                matmul_flops: float = H200_BF16_FLOPS) -> float:
    """Seconds: roofline bound of `rows` expert rows over `hit` distinct local experts (0 rows: 0 s)."""
    if rows == 0:
        return 0.0
    D, F = d_model, d_ff
    flops = 6.0 * D * F * rows
    nbytes = hit * 3.0 * D * F * elem_bytes + rows * (2.0 * D + 2.0 * F) * elem_bytes  # weights + x, y, SwiGLU
    return max(nbytes / hbm_bps, flops / matmul_flops)


def micro_batch_loads(routing: Routing, num_experts: int, world_size: int, micro_batches: int = 2,
                      token_splits=None) -> list[dict]:
    """Per micro-batch: traffic_rows [P, P] (rows p sends to q), rows [P] computed, hit [P] local experts used.

    Rank p's own tokens (contiguous, token_splits) are cut into micro_batch_splits; micro-batch i is the
    i-th cut of every rank.
    """
    P, E = check_int("world_size", world_size, 1), check_int("num_experts", num_experts, 1)
    m = check_int("micro_batches", micro_batches, 1)
    if E % P:
        raise ValueError(f"num_experts={E} is not divisible by world_size={P}")
    El = E // P
    splits = split_tokens(routing.num_tokens, P, token_splits)
    starts = [sum(splits[:p]) for p in range(P)]
    out = []
    for i in range(m):
        traffic = torch.zeros(P, P, dtype=torch.long)
        per_expert = torch.zeros(E, dtype=torch.long)
        for p in range(P):
            cut = micro_batch_splits(splits[p], m)
            lo = starts[p] + sum(cut[:i])
            ids = routing.topk_ids[lo:lo + cut[i]].reshape(-1)
            ids = ids[ids >= 0].cpu()
            traffic[p] += torch.bincount(ids // El, minlength=P)
            per_expert += torch.bincount(ids, minlength=E)
        pe = per_expert.view(P, El)
        out.append(dict(traffic_rows=traffic, rows=pe.sum(1), hit=(pe > 0).sum(1)))
    return out


def _collective(events, label, mb, ready, traffic_bytes, topo) -> float:
    """Schedule one all-to-all starting at `ready`; per-rank bars; returns when its slowest rank ends."""
    per = all_to_all_time(traffic_bytes, topo, per_rank=True)  # [P]
    for p in range(topo.world_size):
        events.append(dict(rank=p, lane="comm", label=label, micro_batch=mb, start=ready,
                           end=ready + float(per[p])))
    return ready + (float(per.max()) if per.numel() else 0.0)


def layer_timeline(loads: list[dict], topo: Topology, d_model: int, d_ff: int, elem_bytes: int = 2,
                   **roofline) -> dict:
    """Schedule dispatch, compute and combine of the micro-batches in `loads` (micro_batch_loads) on `topo`.

    Token rows are d_model values of elem_bytes each. Returns dict(events: [dict(rank, lane, label,
    micro_batch, start, end)] in seconds, total_s, comm_s (sum of collective durations), compute_s
    (the slowest rank's total compute), micro_batches).
    """
    if not loads:
        raise ValueError("loads must hold at least one micro-batch (micro_batch_loads)")
    P = topo.world_size
    if loads[0]["traffic_rows"].shape != (P, P):
        raise ValueError(f"loads are for P={loads[0]['traffic_rows'].shape[0]} ranks, topology has {P}")
    row = d_model * elem_bytes
    events: list[dict] = []
    comm_free = 0.0
    dispatch_end = []
    comm_total = 0.0
    for i, ld in enumerate(loads):  # every dispatch first, in order
        end = _collective(events, f"dispatch {i}", i, comm_free, ld["traffic_rows"] * row, topo)
        comm_total += end - comm_free
        dispatch_end.append(end)
        comm_free = end
    compute_free = [0.0] * P
    busy = [0.0] * P
    for i, ld in enumerate(loads):  # per micro-batch: compute on every rank, then its combine
        ends = []
        for p in range(P):
            t = expert_time(int(ld["rows"][p]), int(ld["hit"][p]), d_model, d_ff, elem_bytes, **roofline)
            s = max(compute_free[p], dispatch_end[i])
            events.append(dict(rank=p, lane="compute", label=f"experts {i}", micro_batch=i, start=s, end=s + t))
            compute_free[p] = s + t
            busy[p] += t
            ends.append(s + t)
        ready = max([comm_free] + ends)
        end = _collective(events, f"combine {i}", i, ready, ld["traffic_rows"].t() * row, topo)
        comm_total += end - ready
        comm_free = end
    return dict(events=events, total_s=comm_free, comm_s=comm_total, compute_s=max(busy), micro_batches=len(loads))
