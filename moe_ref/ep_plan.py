"""Expert-parallel plan: what one rank does, written once for the real run and the simulation.

Legend: T tokens (this rank's own), D d_model, F d_ff, E experts (global), K top-k, C capacity per
expert, P ranks, El = E / P local experts per rank, N rows this rank sends, M rows it receives.

Experts are sharded in contiguous blocks: rank r owns experts [r*El, (r+1)*El). Because the blocks are
contiguous, grouping assignments by expert (moe_ref.group_by_expert) already groups them by destination
rank: the send buffer is permute(x, plan) and rank r's part is the rows of its El experts.

One forward on one rank (`rank_program`):
  1. capacity (only when a CapacityConfig limits anything): all-gather every rank's routing
     (ids, weights and, for reroute, logits: K*2 (+E) float64 numbers per token, tiny next to D) and run
     moe_ref.apply_capacity on the global routing, in global token order (rank 0's tokens first). Every
     rank reaches the same decision, so the kept set, the drops and the spill passes are exactly those of
     one process over the concatenated batch; overflow="error" raises the same error on every rank.
  2. per pass: counts exchange (all_to_all of the [P, El] per-expert counts), then the token rows
     (all_to_all with uneven splits), local expert compute with any registered strategy, the reverse
     all_to_all, and the deterministic weighted combine (moe_ref.unpermute) of this rank's own tokens.
  3. stats: one all-gather of a few integers per rank, so every rank knows the traffic matrix and the
     per-rank loads (the imbalance across ranks).

The program is a generator: at each collective it *yields* a request (AllToAll / AllGather / Wait) and is
sent back the result. moe_ref.parallel runs it with torch.distributed (one program per process) or simulates
P programs in lockstep in one process, answering the same requests with list shuffles. The plan code is
therefore literally the same in both. A request may name a subgroup (`ranks`: the global ranks of the
group, in order; subgroups come from torch.distributed.new_group) and may be asynchronous (`async_op`: the
answer is a handle, and a later `Wait(handle)` yields the result).

Step 2's token exchange is pluggable (`rank_program(..., exchange=...)`): `flat_exchange` below (one
all_to_all over all P ranks), moe_ref.parallel.hierarchical (inter-node, then intra-node) and
moe_ref.parallel.overlap (two micro-batches, asynchronous). Further schemes register by name
(`register_scheme`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator

import torch

from .capacity import CapacityResult, apply_capacity
from .config import CapacityConfig
from .grouping import DispatchPlan, group_by_expert
from .layer import moe_forward
from .permute import combine_dtype, permute, unpermute
from .reference import check_weights
from .router import Routing, validate_routing
from .strategy import get_strategy

__all__ = ["AllToAll", "AllGather", "Wait", "PassResult", "EPRankStats", "check_world", "shard_bounds",
           "shard_experts", "dispatch_splits", "local_expert_ids", "flat_exchange", "local_compute", "rank_program",
           "check_inputs", "global_capacity", "SCHEMES", "get_scheme", "register_scheme"]


# ----------------------------------------------------------------------------- collective requests
@dataclass
class AllToAll:
    """Send rows send_splits[q] of `tensor` (in order) to rank q; receive recv_splits[q] rows from rank q.

    The answer is a tensor of sum(recv_splits) rows, grouped by source rank (rank 0's rows first).
    """

    tensor: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    tag: str = "tokens"  # "tokens" (token rows) or "meta" (counts, routing, stats): for traffic meters
    ranks: tuple[int, ...] | None = None  # the subgroup's ranks in order (splits index into it); None = all
    async_op: bool = False  # answer with a handle; `yield Wait(handle)` gives the rows


@dataclass
class AllGather:
    """Every rank contributes `tensor` (dim 0 may differ per rank); the answer is the list of P tensors."""

    tensor: torch.Tensor
    tag: str = "meta"


@dataclass
class Wait:
    """Wait for an asynchronous request's handle; the answer is what the request would have answered."""

    handle: object


@dataclass
class PassResult:
    """What one pass of a token exchange returns to rank_program.

    output [T, D] (this rank's tokens, combine dtype); send_rows / recv_rows [P] token rows this rank sent
    to / received from each rank (dispatch; the combine moves the same rows back); load [El] rows each
    local expert computed; meta_bytes: bytes of the exchange's small messages (counts, routing).
    """

    output: torch.Tensor
    send_rows: torch.Tensor
    recv_rows: torch.Tensor
    load: torch.Tensor
    meta_bytes: int = 0


Program = Generator[object, object, tuple[torch.Tensor, "EPRankStats"]]


# ----------------------------------------------------------------------------- sharding
def check_world(num_experts: int, world_size: int) -> int:
    """El = E / P; a clear ValueError when E is not divisible by P."""
    for name, v in (("num_experts", num_experts), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by world_size={world_size}: "
                         f"experts are sharded in equal contiguous blocks of E/P per rank")
    return num_experts // world_size


def shard_bounds(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank `rank` owns experts [lo, hi) = [rank*El, (rank+1)*El)."""
    El = check_world(num_experts, world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return rank * El, (rank + 1) * El


def shard_experts(w13: torch.Tensor, w2: torch.Tensor, world_size: int, rank: int):
    """This rank's expert weights: w13 [El, 2F, D], w2 [El, D, F] (views of the full [E, ...] tensors)."""
    lo, hi = shard_bounds(w13.shape[0], world_size, rank)
    return w13[lo:hi], w2[lo:hi]


def dispatch_splits(plan: DispatchPlan, world_size: int) -> torch.Tensor:
    """[P, El] rows this rank sends to each rank, per destination-local expert (plan.counts reshaped)."""
    return plan.counts.view(world_size, -1)


def local_expert_ids(recv_counts: torch.Tensor) -> torch.Tensor:
    """[M] local expert of each received row; recv_counts [P, El] (rows arrive source-major, expert-minor)."""
    P, El = recv_counts.shape
    experts = torch.arange(El, device=recv_counts.device).repeat(P)  # [P*El]
    return torch.repeat_interleave(experts, recv_counts.reshape(-1))  # [M]


# ----------------------------------------------------------------------------- stats
@dataclass
class EPRankStats:
    """What one forward cost on one rank, plus the group-wide view every rank learns at the end.

    send_rows / recv_rows:  [P] token rows this rank sent to / received from each rank (dispatch, all
                            passes; the combine moves the same rows back). Index `rank` is the local copy.
    local_expert_load:      [El] rows each local expert computed (all passes).
    bytes_sent / bytes_received: token-row bytes that crossed to / from *other* ranks, dispatch + combine.
    meta_bytes_sent:        bytes of the small exchanges this rank sent: counts, capacity all-gather, stats.
    traffic_rows:           [P, P] rows sent from rank p (row) to rank q (column), the whole group.
    rank_load:              [P] rows computed on each rank; imbalance = max / mean of it (1 = even).
    capacity, passes, dropped, dropped_tokens, rerouted: the (global) capacity outcome, as MoEStats;
    dropped_own: assignments of this rank's own tokens that were dropped.
    """

    rank: int
    world_size: int
    num_tokens: int
    row_bytes: int
    send_rows: torch.Tensor
    recv_rows: torch.Tensor
    local_expert_load: torch.Tensor
    meta_bytes_sent: int = 0
    capacity: int | None = None
    passes: int = 1
    dropped: int = 0
    dropped_tokens: int = 0
    rerouted: int = 0
    dropped_own: int = 0
    traffic_rows: torch.Tensor | None = field(default=None, repr=False)
    rank_load: torch.Tensor | None = None
    rank_tokens: torch.Tensor | None = None

    @property
    def bytes_sent(self) -> int:
        off = int(self.send_rows.sum() - self.send_rows[self.rank])
        off_back = int(self.recv_rows.sum() - self.recv_rows[self.rank])
        return (off + off_back) * self.row_bytes  # dispatch out + combine results out

    @property
    def bytes_received(self) -> int:
        off = int(self.recv_rows.sum() - self.recv_rows[self.rank])
        off_back = int(self.send_rows.sum() - self.send_rows[self.rank])
        return (off + off_back) * self.row_bytes

    @property
    def imbalance(self) -> float:
        """max / mean of rows computed per rank (1.0 = even; 1.0 also when nothing was computed)."""
        load = self.rank_load.double()
        return 1.0 if float(load.sum()) == 0 else float(load.max() / load.mean())

    @property
    def traffic_bytes(self) -> torch.Tensor:
        """[P, P] dispatch bytes from rank p to rank q (the combine sends the transpose back)."""
        return self.traffic_rows * self.row_bytes


# ----------------------------------------------------------------------------- the program
def _routing_meta(r: Routing, with_logits: bool) -> torch.Tensor:
    """[T, 2K (+E)] float64: ids, weights (and logits) of a routing, packed for one all-gather (exact)."""
    parts = [r.topk_ids.double(), r.topk_weights.double()]
    if with_logits:
        parts.append(r.logits.double())
    return torch.cat(parts, 1)


def _unpack_meta(meta: torch.Tensor, K: int, with_logits: bool) -> Routing:
    return Routing(topk_ids=meta[:, :K].long(), topk_weights=meta[:, K:2 * K].float(),
                   logits=meta[:, 2 * K:].float() if with_logits else None)


def global_capacity(routing: Routing, E: int, P: int, rank: int, capacity: CapacityConfig | None,
                     scoring: str):
    """All-gather every rank's routing and apply capacity to it in global token order (rank 0 first).

    Returns (CapacityResult over all T_total tokens, this rank's first global token, meta bytes sent).
    Every rank computes the same result, so an error (overflow="error", reroute without logits) is
    raised on every rank alike, and no rank is left waiting in a collective.
    """
    K = routing.top_k
    with_logits = capacity is not None and capacity.overflow == "reroute" and routing.logits is not None
    meta = _routing_meta(routing, with_logits)  # [T, 2K (+E)]
    parts = yield AllGather(meta)
    if len({p.shape[1] for p in parts}) != 1:  # every rank sees the same widths, so every rank raises
        raise ValueError("overflow='reroute' needs logits on every rank's routing (some ranks have none)")
    offset = sum(p.shape[0] for p in parts[:rank])
    global_r = _unpack_meta(torch.cat(parts), K, with_logits)  # [T_total, K]
    cap = apply_capacity(global_r, E, capacity, scoring)  # identical on every rank; may raise ("error")
    return cap, offset, meta.numel() * meta.element_size() * (P - 1)


def check_inputs(x, routing, w13_local, w2_local, num_experts, world_size, rank, strategy, capacity):
    if not isinstance(world_size, int) or isinstance(world_size, bool):
        raise ValueError(f"world_size must be an int, got {world_size!r}")
    El = check_world(num_experts, world_size)
    shard_bounds(num_experts, world_size, rank)
    get_strategy(strategy)
    if capacity is not None and not isinstance(capacity, CapacityConfig):
        raise TypeError(f"capacity must be a moe_ref.CapacityConfig or None, got {type(capacity).__name__}")
    e_local, D, F = check_weights(x, w13_local, w2_local)
    if e_local != El:
        raise ValueError(f"rank {rank}: w13_local/w2_local must hold this rank's El = E/P = {num_experts}/"
                         f"{world_size} = {El} experts, got {e_local} (w13_local {tuple(w13_local.shape)}); "
                         f"use moe_ref.parallel.shard_experts")
    validate_routing(routing, x.shape[0], num_experts)
    if routing.topk_ids.device != x.device:
        raise ValueError(f"routing is on {routing.topk_ids.device} but x is on {x.device}")
    return El, D, F


def flat_exchange(x: torch.Tensor, r: Routing, w13_local: torch.Tensor, w2_local: torch.Tensor, *,
                  num_experts: int, world_size: int, rank: int, strategy: str):
    """One pass over all P ranks: counts exchange, token rows all_to_all, local compute, reverse, combine.

    x [T, D], r [T, K] (global ids, -1 dropped). A generator of requests; returns a PassResult.
    """
    P, E = world_size, num_experts
    El = E // P
    plan = group_by_expert(r.topk_ids, E)  # grouped by expert == grouped by destination rank
    send_counts = dispatch_splits(plan, P)  # [P, El]
    recv_counts = yield AllToAll(send_counts.reshape(-1), [El] * P, [El] * P, "meta")  # counts first
    recv_counts = recv_counts.view(P, El)  # [P, El] rows from rank p for local expert j
    send_splits = send_counts.sum(1).tolist()  # [P] (host sync: split sizes are host ints)
    recv_splits = recv_counts.sum(1).tolist()  # [P]
    xs = permute(x, plan)  # [N, D] grouped by destination rank, then expert
    xr = yield AllToAll(xs, send_splits, recv_splits)  # [M, D] grouped by source, then local expert
    yr = local_compute(xr, recv_counts, w13_local, w2_local, strategy)  # [M, D], same row order
    ys = yield AllToAll(yr, recv_splits, send_splits)  # [N, D] back in this rank's send order
    yp = unpermute(ys, plan, r.topk_weights)  # [T, D] deterministic gather-and-reduce over K
    return PassResult(yp, torch.tensor(send_splits), torch.tensor(recv_splits), recv_counts.sum(0).cpu(),
                      El * (P - 1) * 8)


def rank_program(x: torch.Tensor, routing: Routing, w13_local: torch.Tensor, w2_local: torch.Tensor, *,
                 num_experts: int, world_size: int, rank: int, strategy: str = "grouped",
                 capacity: CapacityConfig | None = None, scoring: str = "softmax",
                 ranks_per_node: int | None = None, exchange=None) -> Program:
    """The expert-parallel forward of one rank, as a generator of collective requests.

    x [T, D] and routing ([T, K], global expert ids) are this rank's own tokens; w13_local [El, 2F, D] and
    w2_local [El, D, F] its expert shard. Returns (y [T, D] in x's dtype, EPRankStats).
    exchange: the per-pass token exchange (a generator function with flat_exchange's signature returning
    a PassResult); None = flat_exchange. ranks_per_node is a layout hint for exchanges that use one
    (the flat exchange ignores it).
    Input errors are raised before the first collective (on this rank only; the launcher's timeout and
    the peers' broken connections end the others).
    """
    El, D, _ = check_inputs(x, routing, w13_local, w2_local, num_experts, world_size, rank, strategy, capacity)
    P, E = world_size, num_experts
    T = x.shape[0]
    dev = x.device
    exchange = flat_exchange if exchange is None else exchange
    meta_bytes = 0

    # 1. capacity: one globally consistent decision over all ranks' routings
    if capacity is not None and capacity.overflow != "dropless":
        cap, offset, meta_bytes = yield from global_capacity(routing, E, P, rank, capacity, scoring)
        sl = slice(offset, offset + T)
        passes = [Routing(topk_ids=p.topk_ids[sl], topk_weights=p.topk_weights[sl]) for p in cap.passes]
        dropped_own = int(((routing.topk_ids >= 0) & (cap.final_ids[sl] < 0)).sum())
    else:
        cap, passes, dropped_own = CapacityResult(passes=[routing], capacity=None), [routing], 0

    # 2. dispatch -> expert compute -> combine, once per pass
    send_rows = torch.zeros(P, dtype=torch.long)
    recv_rows = torch.zeros(P, dtype=torch.long)
    load = torch.zeros(El, dtype=torch.long)
    y = None
    for r in passes:
        res = yield from exchange(x, r, w13_local, w2_local, num_experts=E, world_size=P, rank=rank,
                                  strategy=strategy)
        y = res.output if y is None else y.to(combine_dtype(x.dtype)) + res.output
        send_rows += res.send_rows
        recv_rows += res.recv_rows
        load += res.load
        meta_bytes += res.meta_bytes

    # 3. group-wide stats: traffic matrix and per-rank loads (a few ints per rank)
    mine = torch.cat([send_rows, load.sum().view(1), torch.tensor([T])]).to(dev)  # [P + 2]
    allv = yield AllGather(mine[None])
    meta_bytes += mine.numel() * 8 * (P - 1)
    allv = torch.cat(allv).cpu()  # [P, P + 2]
    stats = EPRankStats(rank=rank, world_size=P, num_tokens=T, row_bytes=D * x.element_size(),
                        send_rows=send_rows, recv_rows=recv_rows, local_expert_load=load,
                        meta_bytes_sent=meta_bytes, capacity=cap.capacity, passes=len(passes),
                        dropped=cap.dropped, dropped_tokens=cap.dropped_tokens, rerouted=cap.rerouted,
                        dropped_own=dropped_own, traffic_rows=allv[:, :P], rank_load=allv[:, P],
                        rank_tokens=allv[:, P + 1])
    return y.to(x.dtype), stats


def local_compute(xr: torch.Tensor, recv_counts: torch.Tensor, w13_local: torch.Tensor,
                  w2_local: torch.Tensor, strategy: str) -> torch.Tensor:
    """Run received rows xr [M, D] through their local experts with a registered strategy.

    The rows are re-grouped by local expert by the strategy itself: each row is a "token" routed to one
    local expert (K=1) with weight 1, so the strategy returns the unweighted expert output per row; the
    gate weight is applied later, in the combine on the token's own rank.
    """
    if xr.shape[0] == 0:
        return xr.new_zeros(0, xr.shape[1])
    ids = local_expert_ids(recv_counts.to(xr.device))[:, None]  # [M, 1]
    r = Routing(topk_ids=ids, topk_weights=torch.ones(ids.shape, device=xr.device))
    return moe_forward(xr, r, w13_local, w2_local, strategy=strategy).output  # [M, D]


# ----------------------------------------------------------------------------- schemes by name
SCHEMES = {"grouped": rank_program}  # moe_ref.parallel registers "naive", "hierarchical", "overlap"


def get_scheme(name: str):
    """The plan generator of scheme `name` ("grouped" all_to_all, or one registered: "naive" all-gather, ...)."""
    if name not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {name!r}")
    return SCHEMES[name]


def register_scheme(name: str, program) -> None:
    """Add a plan generator under `name` (moe_ref.parallel registers "naive", "hierarchical" and "overlap")."""
    if not isinstance(name, str) or not name or not callable(program):
        raise TypeError("register_scheme needs a non-empty name and a callable plan generator")
    SCHEMES[name] = program
