"""Running one rank's EP plan on torch.distributed (gloo on CPU, NCCL on CUDA; launched by torchrun).

Legend: T tokens (this rank's own), D d_model, F d_ff, E experts, K top-k, P ranks, El = E / P.

The plan (moe_ref.ep_plan) yields AllToAll / AllGather / Wait requests; this module answers each with
the matching collective (on a subgroup from torch.distributed.new_group when the request names one;
with async_op=True when the request is asynchronous). Split sizes are host integers (all_to_all_single
takes Python lists), so each pass synchronises once on the counts; production systems (DeepEP, pplx)
avoid that with fixed-size buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import CapacityConfig
from ..ep_plan import AllGather, AllToAll, EPRankStats, Wait, get_scheme
from ..router import Routing


@dataclass
class EPOutput:
    """What ep_forward returns on one rank: its own tokens' output and that rank's stats."""

    output: torch.Tensor  # [T, D] this rank's tokens
    stats: EPRankStats


def all_gather_uneven(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """all_gather where dim 0 may differ per rank: gather sizes, pad to the largest, gather, trim.

    t [N_p, ...] on rank p; returns the P tensors [N_0, ...], ..., [N_{P-1}, ...] on every rank.
    """
    P = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)  # [1]
    sizes = [torch.zeros_like(n) for _ in range(P)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))  # [max N_p, ...]
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(P)]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [o[:s] for o, s in zip(out, sizes)]


def all_to_all_rows(t: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None,
                    async_op: bool = False):
    """Send rows send_splits[q] of t [N, ...] to rank q; returns the [sum(recv_splits), ...] rows received.

    async_op=True returns (Work, output) at once: the rows are there after Work.wait().
    """
    t = t.contiguous()
    out = t.new_empty((sum(recv_splits),) + tuple(t.shape[1:]))  # [M, ...] grouped by source rank
    work = dist.all_to_all_single(out, t, recv_splits, send_splits, group=group, async_op=async_op)
    return (work, out) if async_op else out


def subgroups(world_size: int, ranks_per_node: int, group=None) -> dict[tuple[int, ...], object]:
    """The node groups and the same-local-index groups of a layout, from torch.distributed.new_group.

    Keys are tuples of ranks of `group` (what the plan's requests name); every rank must call this
    together, in the same order (new_group is collective). Created once per (group, layout) and reused.
    """
    key = (id(group if group is not None else dist.group.WORLD), world_size, ranks_per_node)
    if key not in _SUBGROUPS:
        from .hierarchical import layout_groups

        out = {}
        for ranks in layout_groups(world_size, ranks_per_node):
            glob = ranks if group is None else tuple(dist.get_global_rank(group, r) for r in ranks)
            out[ranks] = dist.new_group(list(glob))
        _SUBGROUPS[key] = out
    return _SUBGROUPS[key]


_SUBGROUPS: dict = {}


def run_with_torch_distributed(program, group=None, subgroups: dict | None = None):
    """Drive one rank's plan generator, answering each request with a torch.distributed collective.

    subgroups: {ranks tuple: process group} for requests that name a subgroup. Asynchronous all_to_all
    requests are answered with (Work, output) handles; Wait requests wait on them.
    """
    try:
        req = next(program)
        while True:
            if isinstance(req, AllToAll):
                g = group if req.ranks is None else (subgroups or {}).get(tuple(req.ranks))
                if req.ranks is not None and g is None:
                    raise RuntimeError(f"request names subgroup {tuple(req.ranks)}, which was not created")
                answer = all_to_all_rows(req.tensor, req.send_splits, req.recv_splits, g, req.async_op)
            elif isinstance(req, AllGather):
                answer = all_gather_uneven(req.tensor, group)
            elif isinstance(req, Wait):
                work, out = req.handle
                work.wait()
                answer = out
            else:
                raise TypeError(f"unknown collective request {type(req).__name__}")
            req = program.send(answer)
    except StopIteration as stop:
        return stop.value


def ep_forward(x: torch.Tensor, routing: Routing, w13_local: torch.Tensor, w2_local: torch.Tensor, *,
               num_experts: int, group=None, strategy: str = "grouped", capacity: CapacityConfig | None = None,
               scoring: str = "softmax", scheme: str = "grouped", ranks_per_node: int | None = None) -> EPOutput:
    """Expert-parallel MoE forward of this process's tokens x [T, D] with its shard w13_local [El, 2F, D].

    Every rank of `group` (default: the world) must call it together. routing [T, K] holds global expert
    ids. Returns this rank's output [T, D] and EPRankStats (including the group's traffic matrix).
    scheme="hierarchical" needs ranks_per_node (P = nodes * ranks_per_node; subgroups from new_group).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ep_forward needs torch.distributed initialised (torchrun + init_process_group); "
                           "for a single process use moe_ref.parallel.simulate_ep")
    plan = get_scheme(scheme)
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    subs = subgroups(P, ranks_per_node, group) if scheme == "hierarchical" and ranks_per_node else None
    prog = plan(x, routing, w13_local, w2_local, num_experts=num_experts, world_size=P, rank=rank,
                strategy=strategy, capacity=capacity, scoring=scoring, ranks_per_node=ranks_per_node)
    y, stats = run_with_torch_distributed(prog, group, subs)  # y [T, D]
    return EPOutput(y, stats)
