"""Hierarchical all-to-all: across nodes once per destination node, then inside the node.

Legend: T tokens (this rank's own), D d_model, E experts, K top-k, P ranks = N nodes × L ranks per node,
El = E / P experts per rank, En = L * El experts per node; rank g = n * L + l sits on node n with local
index l. Na rows this rank sends across, Ma rows it receives.

A flat all_to_all sends one row per (token, expert) assignment, so a token whose K experts lie on two
ranks of the same remote node crosses the slow inter-node link twice. Here (the order DeepEP's
internode dispatch uses: RDMA to the same local index, then NVLink inside the node):

  A. inter-node, in the group of ranks with local index l ({m * L + l}): each token goes once to every
     node that holds at least one of its experts, to the rank with this rank's local index, with its
     routing (ids, weights: 2K float64 values per row, exact);
  B. intra-node, in the node's group ({n * L + j}): the forwarding rank sends one row per assignment to
     the rank owning the expert (the flat exchange's grouping, restricted to this node's experts);
     local expert compute; rows back;
  B'. the forwarding rank combines each token's experts of this node into one weighted partial row;
  A'. the partial rows go back across (one per token and destination node) and the token's owner adds
     them in node order (deterministic; no atomics).

So a token crosses the inter-node link at most once per destination node, each way. The same answer as the
flat exchange up to the summation order (per node first). Subgroups are the requests' `ranks`: the
simulation answers them per group, the torch.distributed runner with groups from new_group.
"""

from __future__ import annotations

import torch

from ..ep_plan import AllToAll, PassResult, local_compute, rank_program, register_scheme
from ..grouping import group_by_expert
from ..permute import combine_dtype, permute, unpermute
from ..router import Routing
from ..validate import check_int

__all__ = ["check_layout", "layout_groups", "hierarchical_exchange", "hierarchical_rank_program"]


def check_layout(world_size: int, ranks_per_node: int, num_experts: int | None = None) -> int:
    """N = P / L nodes; clear errors when L does not divide P (or P does not divide E)."""
    P = check_int("world_size", world_size, 1)
    L = check_int("ranks_per_node", ranks_per_node, 1)
    if P % L:
        raise ValueError(f"ranks_per_node={L} does not divide world_size={P}: nodes hold equal numbers of ranks")
    if num_experts is not None and num_experts % P:
        raise ValueError(f"num_experts={num_experts} is not divisible by world_size={P}")
    return P // L


def layout_groups(world_size: int, ranks_per_node: int) -> list[tuple[int, ...]]:
    """Every subgroup of the layout, in a fixed order: the N node groups, then the L same-local-index groups."""
    N, L = check_layout(world_size, ranks_per_node), ranks_per_node
    nodes = [tuple(range(n * L, (n + 1) * L)) for n in range(N)]
    peers = [tuple(m * L + j for m in range(N)) for j in range(L)]
    return nodes + [g for g in peers if g not in nodes]  # L = 1 or N = 1: a group would appear twice


def hierarchical_exchange(x: torch.Tensor, r: Routing, w13_local: torch.Tensor, w2_local: torch.Tensor, *,
                          num_experts: int, world_size: int, rank: int, strategy: str, ranks_per_node: int):
    """One pass of steps A, B, B', A' (module doc) on this rank; a generator of requests, returns a PassResult."""
    P, E, L = world_size, num_experts, ranks_per_node
    N = check_layout(P, L, E)
    El, T, K, D = E // P, x.shape[0], r.top_k, x.shape[1]
    En = L * El
    n, l = divmod(rank, L)
    node_ranks = tuple(range(n * L, (n + 1) * L))  # step B group: this node
    peer_ranks = tuple(m * L + l for m in range(N))  # step A group: same local index on every node

    # A. one row per (token, destination node), node-major, token order inside
    ids = r.topk_ids  # [T, K], -1 dropped
    dest = torch.where(ids >= 0, ids // En, N)  # [T, K] destination node (N = dropped)
    hit = torch.zeros(T, N + 1, dtype=torch.long, device=x.device).scatter_(1, dest, 1)[:, :N]  # [T, N]
    node_of_row, tok = hit.t().nonzero(as_tuple=True)  # [Na] each, sorted by node, then token
    send_a = hit.sum(0).tolist()  # [N]
    recv_a = (yield AllToAll(torch.tensor(send_a, device=x.device), [1] * N, [1] * N, "meta",
                             ranks=peer_ranks)).tolist()  # [N]
    xa = yield AllToAll(x.index_select(0, tok), send_a, recv_a, "tokens", ranks=peer_ranks)  # [Ma, D]
    meta = torch.cat([ids.index_select(0, tok).double(), r.topk_weights.index_select(0, tok).double()], 1)
    ma = yield AllToAll(meta, send_a, recv_a, "meta", ranks=peer_ranks)  # [Ma, 2K]
    ids_a, w_a = ma[:, :K].long(), ma[:, K:].float()  # [Ma, K] each

    # B. inside the node: one row per assignment to this node's experts, grouped by local rank then expert
    mine = (ids_a >= 0) & (ids_a // En == n)
    plan = group_by_expert(torch.where(mine, ids_a - n * En, -1), En)  # node-local expert ids [Ma, K]
    send_counts = plan.counts.view(L, El)  # [L, El]
    recv_counts = (yield AllToAll(send_counts.reshape(-1), [El] * L, [El] * L, "meta",
                                  ranks=node_ranks)).view(L, El)  # [L, El] rows from local rank j
    send_b, recv_b = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()  # [L] each
    xb = yield AllToAll(permute(xa, plan), send_b, recv_b, "tokens", ranks=node_ranks)  # [Mb, D]
    yb = local_compute(xb, recv_counts, w13_local, w2_local, strategy)  # [Mb, D]
    ysb = yield AllToAll(yb, recv_b, send_b, "tokens", ranks=node_ranks)  # [Nb, D] in send order

    # B'. one weighted partial row per received token (its experts on this node), then A'. back across
    part = unpermute(ysb, plan, w_a)  # [Ma, D]
    back = yield AllToAll(part, recv_a, send_a, "tokens", ranks=peer_ranks)  # [Na, D] node-major
    y = torch.zeros(T, D, dtype=combine_dtype(x.dtype), device=x.device)
    for m, rows in enumerate(back.split(send_a)):  # add the nodes' partials in node order
        sel = tok[node_of_row == m]
        y[sel] += rows.to(y.dtype)

    send_rows = torch.zeros(P, dtype=torch.long)
    recv_rows = torch.zeros(P, dtype=torch.long)
    send_rows[list(peer_ranks)] += torch.tensor(send_a)
    recv_rows[list(peer_ranks)] += torch.tensor(recv_a)
    send_rows[list(node_ranks)] += torch.tensor(send_b)
    recv_rows[list(node_ranks)] += torch.tensor(recv_b)
    off_a = sum(send_a) - send_a[n]
    meta_bytes = 8 * ((N - 1) + off_a * 2 * K + El * (L - 1))
    return PassResult(y, send_rows, recv_rows, recv_counts.sum(0).cpu(), meta_bytes)


def hierarchical_rank_program(x, routing, w13_local, w2_local, *, num_experts: int, world_size: int, rank: int,
                              strategy: str = "grouped", capacity=None, scoring: str = "softmax",
                              ranks_per_node: int | None = None):
    """rank_program with the hierarchical exchange (ranks_per_node is required: P = nodes * ranks_per_node)."""
    if ranks_per_node is None:
        raise ValueError("scheme 'hierarchical' needs ranks_per_node (P = nodes * ranks_per_node)")
    check_layout(world_size, ranks_per_node, num_experts)

    def exchange(*args, **kw):
        return hierarchical_exchange(*args, ranks_per_node=ranks_per_node, **kw)

    return (yield from rank_program(x, routing, w13_local, w2_local, num_experts=num_experts,
                                    world_size=world_size, rank=rank, strategy=strategy, capacity=capacity,
                                    scoring=scoring, exchange=exchange))


register_scheme("hierarchical", hierarchical_rank_program)
