"""Two micro-batches per rank, so that one's all-to-all is in flight while the other's experts compute.

Legend: T tokens (this rank's own), D d_model, E experts, K top-k, P ranks, El = E / P; T0 + T1 = T.

The rank's tokens are cut in two contiguous micro-batches. Counts are exchanged first (small, blocking);
then both dispatches start asynchronously (async_op=True on torch.distributed), and

    wait dispatch 0 -> experts 0 -> start combine 0 -> wait dispatch 1 -> experts 1 -> start combine 1
    -> wait combine 0, combine 1

so micro-batch 1's dispatch travels while micro-batch 0 computes, and micro-batch 0's combine while
micro-batch 1 computes. Each micro-batch is the flat exchange's grouping on its own tokens: the same rows
cross the same links as without overlap (only cut in two), and the output is the same. How much time
the overlap saves is what moe_ref.parallel.timeline models; gloo on CPU runs the collectives on its own
threads, so the real run checks the answer and the request order, not a speed-up.
"""

from __future__ import annotations

import torch

from ..ep_plan import AllToAll, PassResult, Wait, dispatch_splits, local_compute, rank_program, register_scheme
from ..grouping import group_by_expert
from ..permute import combine_dtype, permute, unpermute
from ..router import Routing

__all__ = ["micro_batch_splits", "overlap_exchange", "overlap_rank_program"]


def micro_batch_splits(num_tokens: int, micro_batches: int = 2) -> list[int]:
    """Near-even contiguous micro-batch sizes (the first ones one larger)."""
    base, extra = divmod(num_tokens, micro_batches)
    return [base + (1 if i < extra else 0) for i in range(micro_batches)]


def overlap_exchange(x: torch.Tensor, r: Routing, w13_local: torch.Tensor, w2_local: torch.Tensor, *,
                     num_experts: int, world_size: int, rank: int, strategy: str, micro_batches: int = 2):
    """One pass in `micro_batches` overlapped micro-batches (module doc); returns a PassResult."""
    P, E = world_size, num_experts
    El = E // P
    sizes = micro_batch_splits(x.shape[0], micro_batches)
    xs_mb, ids_mb, w_mb = x.split(sizes), r.topk_ids.split(sizes), r.topk_weights.split(sizes)
    plans = [group_by_expert(ids, E) for ids in ids_mb]
    sends, recvs = [], []
    for plan in plans:  # counts first, blocking (host ints for the splits)
        c = dispatch_splits(plan, P)  # [P, El]
        rc = (yield AllToAll(c.reshape(-1), [El] * P, [El] * P, "meta")).view(P, El)
        sends.append(c)
        recvs.append(rc)
    s_spl = [c.sum(1).tolist() for c in sends]
    r_spl = [c.sum(1).tolist() for c in recvs]
    dispatch = []
    for i, plan in enumerate(plans):  # every dispatch in flight
        dispatch.append((yield AllToAll(permute(xs_mb[i], plan), s_spl[i], r_spl[i], async_op=True)))
    combine = []
    for i in range(micro_batches):  # compute micro-batch i while the later dispatches / earlier combines travel
        xr = yield Wait(dispatch[i])  # [M_i, D]
        yr = local_compute(xr, recvs[i], w13_local, w2_local, strategy)
        combine.append((yield AllToAll(yr, r_spl[i], s_spl[i], async_op=True)))
    parts = []
    for i, plan in enumerate(plans):
        ys = yield Wait(combine[i])  # [N_i, D]
        parts.append(unpermute(ys, plan, w_mb[i]).to(combine_dtype(x.dtype)))  # [T_i, D]
    send_rows = torch.tensor(s_spl).sum(0)
    recv_rows = torch.tensor(r_spl).sum(0)
    load = sum(c.sum(0).cpu() for c in recvs)
    return PassResult(torch.cat(parts), send_rows, recv_rows, load, micro_batches * El * (P - 1) * 8)


def overlap_rank_program(x, routing, w13_local, w2_local, *, num_experts: int, world_size: int, rank: int,
                         strategy: str = "grouped", capacity=None, scoring: str = "softmax",
                         ranks_per_node: int | None = None):
    """rank_program with the two-micro-batch overlapped exchange (ranks_per_node is not used)."""
    return (yield from rank_program(x, routing, w13_local, w2_local, num_experts=num_experts,
                                    world_size=world_size, rank=rank, strategy=strategy, capacity=capacity,
                                    scoring=scoring, exchange=overlap_exchange))


register_scheme("overlap", overlap_rank_program)
