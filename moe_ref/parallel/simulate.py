"""Expert parallelism simulated in one process: P virtual ranks run the real plan in lockstep.

Legend: T tokens (T_total: the whole batch), D d_model, F d_ff, E experts, K top-k, P ranks, El = E / P.

Each collective the P plan generators (moe_ref.ep_plan) yield together is answered by list shuffles of
the same split sizes, and every byte between every pair of ranks is metered, so the grouped all_to_all can
be compared with the naive scheme (`scheme="naive"`: all-gather every token, reduce-scatter partials).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import CapacityConfig
from ..ep_plan import AllGather, EPRankStats, Wait, check_world, get_scheme, shard_experts
from ..router import Routing, check_x2d
from .split import split_routing, split_tokens


@dataclass
class EPSimResult:
    """A simulated EP forward over P virtual ranks.

    output:        [T_total, D] all ranks' outputs concatenated in rank order (= the input order).
    rank_stats:    one EPRankStats per rank.
    traffic_bytes: {"tokens": [P, P], "meta": [P, P]} bytes rank p sent to rank q, metered by the
                   simulated transport for every collective (diagonal = local copies, not on a link).
    """

    output: torch.Tensor
    rank_stats: list[EPRankStats]
    traffic_bytes: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def traffic_rows(self) -> torch.Tensor:
        """[P, P] dispatch rows from rank p to rank q."""
        return self.rank_stats[0].traffic_rows

    @property
    def rank_load(self) -> torch.Tensor:
        """[P] expert rows computed per rank."""
        return self.rank_stats[0].rank_load

    @property
    def imbalance(self) -> float:
        return self.rank_stats[0].imbalance

    def link_bytes(self, tag: str = "tokens") -> int:
        """Bytes that crossed between distinct ranks (off-diagonal), for one tag."""
        m = self.traffic_bytes[tag]
        return int(m.sum() - m.diagonal().sum())


@dataclass
class _Done:
    """The handle of an asynchronous request in the simulation: the answer, ready at once."""

    value: object


def _all_gather(reqs: list, meter: torch.Tensor, members: list[int]) -> list:
    """Every member gets the group's tensors; member p's tensor is metered once per receiving member."""
    for p, r in zip(members, reqs):
        meter[p, members] += r.tensor.numel() * r.tensor.element_size()
    return [[r.tensor for r in reqs] for _ in reqs]


def _all_to_all(reqs: list, meter: torch.Tensor, members: list[int]) -> list:
    """Member q gets chunk q of every member's tensor, in group order; meter[p, q] += bytes of that chunk."""
    G = len(reqs)
    chunks = []
    for p, r in zip(members, reqs):
        if len(r.send_splits) != G or sum(r.send_splits) != r.tensor.shape[0]:
            raise RuntimeError(f"rank {p}: send_splits {r.send_splits} do not cut {r.tensor.shape[0]} rows")
        chunks.append(r.tensor.split(r.send_splits))
        row = r.tensor[:1].numel() * r.tensor.element_size()
        meter[p, members] += torch.tensor(r.send_splits) * row
    out = []
    for j, (q, r) in enumerate(zip(members, reqs)):
        got = [chunks[i][j] for i in range(G)]
        if [g.shape[0] for g in got] != list(r.recv_splits):
            raise RuntimeError(f"rank {q}: expects {r.recv_splits} rows, peers send {[g.shape[0] for g in got]}")
        out.append(torch.cat(got))  # [sum(recv_splits), ...]
    return out


def _groups(reqs: list) -> list[list[int]]:
    """The subgroups the P requests name (each request's `ranks`, None = all), checked to partition the ranks."""
    P = len(reqs)

    def group_of(r) -> tuple[int, ...]:
        return tuple(range(P)) if getattr(r, "ranks", None) is None else tuple(r.ranks)

    groups, seen = [], set()
    for p, r in enumerate(reqs):
        g = group_of(r)
        if p not in g:
            raise RuntimeError(f"rank {p} asks for a collective of group {g}, which does not contain it")
        if g not in seen:
            if any(set(g) & set(h) for h in groups):
                raise RuntimeError(f"ranks diverged: overlapping groups {g} and {groups}")
            seen.add(g)
            groups.append(g)
    for g in groups:
        if any(q >= P or group_of(reqs[q]) != g for q in g):
            raise RuntimeError(f"ranks diverged: members of group {g} name different groups")
    return [list(g) for g in groups]


def _simulate_step(reqs: list, meters: dict[str, torch.Tensor]) -> list:
    """Answer one lockstep collective of P virtual ranks; meter bytes p -> q under the request's tag."""
    kinds = {type(r) for r in reqs}
    if len(kinds) != 1:
        raise RuntimeError(f"ranks diverged: requests {[type(r).__name__ for r in reqs]}")
    if isinstance(reqs[0], Wait):
        return [r.handle.value for r in reqs]
    P = len(reqs)
    meter = meters.setdefault(reqs[0].tag, torch.zeros(P, P, dtype=torch.long))  # [P, P]
    fn = _all_gather if isinstance(reqs[0], AllGather) else _all_to_all
    answers: list = [None] * P
    for members in _groups(reqs):
        for q, a in zip(members, fn([reqs[q] for q in members], meter, members)):
            answers[q] = _Done(a) if getattr(reqs[q], "async_op", False) else a
    return answers


def _run_lockstep(progs: list) -> tuple[list, dict[str, torch.Tensor]]:
    """Drive P generators together until all return; returns their results and the byte meters."""
    meters: dict[str, torch.Tensor] = {}
    reqs = [next(g) for g in progs]
    while True:
        answers = _simulate_step(reqs, meters)
        nxt, done = [], []
        for g, a in zip(progs, answers):
            try:
                nxt.append(g.send(a))
            except StopIteration as stop:
                done.append(stop.value)
        if done:
            if nxt:
                raise RuntimeError("ranks diverged: some finished while others wait in a collective")
            return done, meters
        reqs = nxt


def _check_sim_inputs(x, routing, w13, world_size) -> int:
    """E, after clear errors for w13, world_size, x and routing."""
    if not isinstance(w13, torch.Tensor) or w13.dim() != 3:
        raise ValueError(f"w13 must be [E, 2F, D], got {getattr(w13, 'shape', type(w13).__name__)}")
    E = w13.shape[0]
    check_world(E, world_size)
    check_x2d(x, w13.shape[2])
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moe_ref.Routing, got {type(routing).__name__}")
    if routing.num_tokens != x.shape[0]:
        raise ValueError(f"routing has {routing.num_tokens} tokens but x has {x.shape[0]}")
    return E


def simulate_ep(x: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor, world_size: int, *,
                token_splits=None, strategy: str = "grouped", capacity: CapacityConfig | None = None,
                scoring: str = "softmax", scheme: str = "grouped", ranks_per_node: int | None = None) -> EPSimResult:
    """Run the EP plan on P virtual ranks in this process.

    x [T_total, D] and routing [T_total, K] are the whole batch; rank p gets the p-th contiguous chunk of
    tokens (sizes token_splits, default near-even) and experts [p*El, (p+1)*El) of w13 [E, 2F, D],
    w2 [E, D, F]. The output equals moe_forward / reference_moe of the whole batch (same capacity).
    scheme: "grouped", "naive", "hierarchical" (needs ranks_per_node: P = nodes * ranks_per_node) or
    "overlap" (two micro-batches). The metered bytes sit at global rank pairs [P, P] whatever the scheme.
    """
    plan = get_scheme(scheme)
    E = _check_sim_inputs(x, routing, w13, world_size)
    splits = split_tokens(x.shape[0], world_size, token_splits)
    progs = []
    for p, (xp, rp) in enumerate(zip(x.split(splits), split_routing(routing, splits))):  # xp [T_p, D]
        w13p, w2p = shard_experts(w13, w2, world_size, p)  # [El, 2F, D], [El, D, F]
        progs.append(plan(xp, rp, w13p, w2p, num_experts=E, world_size=world_size, rank=p,
                          strategy=strategy, capacity=capacity, scoring=scoring, ranks_per_node=ranks_per_node))
    done, meters = _run_lockstep(progs)
    ys, stats = zip(*done)
    return EPSimResult(output=torch.cat(ys), rank_stats=list(stats), traffic_bytes=meters)
