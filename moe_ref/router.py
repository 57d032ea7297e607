"""The router (gating network): which K experts each token goes to, and with what weight.

Legend: T tokens, D d_model, E experts, K top-k.
Default rule (Mixtral): logits = x @ W^T; softmax over all E in float32; top-k (ties: lower
expert index, as torch.topk); renormalise the K weights to sum to 1 when asked.
Node-limited rule (DeepSeek-V3 style, `route_node_limited`): experts sit on N nodes in contiguous blocks;
each token first keeps its M best nodes (by the sum of each node's top-2 scores), then takes top-k there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SCORINGS, check_top_k
from .validate import check_int


@dataclass
class Routing:
    """A routing decision. Build one by hand to bypass the router.

    topk_ids:     [T, K] int64, expert of each (token, choice); -1 marks a dropped assignment
                  (only produced internally by capacity handling).
    topk_weights: [T, K] float32, gate weight of each (token, choice).
    logits:       [T, E] float32 router logits, or None when built by hand.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.topk_ids, torch.Tensor) or not isinstance(self.topk_weights, torch.Tensor):
            raise TypeError("Routing: topk_ids and topk_weights must be torch tensors")
        if self.topk_ids.dtype.is_floating_point or self.topk_ids.dtype == torch.bool:
            raise TypeError(f"Routing: topk_ids must be an integer tensor, got {self.topk_ids.dtype}")
        if not self.topk_weights.dtype.is_floating_point:
            raise TypeError(f"Routing: topk_weights must be floating point, got {self.topk_weights.dtype}")
        if self.topk_ids.dim() != 2 or self.topk_ids.shape != self.topk_weights.shape:
            raise ValueError(
                "Routing: topk_ids and topk_weights must both be [T, K], got "
                f"{tuple(self.topk_ids.shape)} and {tuple(self.topk_weights.shape)}"
            )
        self.topk_ids = self.topk_ids.long()
        self.topk_weights = self.topk_weights.float()

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]

    def probs(self, scoring: str = "softmax") -> torch.Tensor:
        """[T, E] router probabilities (needed by reroute); requires logits."""
        if self.logits is None:
            raise ValueError("this Routing has no logits (built by hand): router probabilities are unknown")
        return torch.softmax(self.logits, -1) if scoring == "softmax" else torch.sigmoid(self.logits)


def validate_routing(r: Routing, num_tokens: int, num_experts: int, *, allow_dropped: bool = False) -> None:
    """Raise a clear ValueError if a Routing does not fit T tokens and E experts."""
    if not isinstance(r, Routing):
        raise TypeError(f"routing must be a moe_ref.Routing, got {type(r).__name__}")
    if r.topk_ids.shape[0] != num_tokens:
        raise ValueError(f"routing has {r.topk_ids.shape[0]} tokens (topk_ids {tuple(r.topk_ids.shape)}) "
                         f"but x has {num_tokens}")
    check_top_k(r.top_k, num_experts)
    if r.topk_ids.numel():
        low = -1 if allow_dropped else 0
        lo, hi = int(r.topk_ids.min()), int(r.topk_ids.max())
        if lo < low or hi >= num_experts:
            raise ValueError(f"routing.topk_ids out of range: values in [{lo}, {hi}] but must be in "
                             f"[{low}, {num_experts - 1}] for num_experts={num_experts}")
        ids = r.topk_ids.masked_fill(r.topk_ids < 0, -1)
        s = ids.sort(-1).values
        dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        if bool(dup.any()):
            t = int(dup.any(-1).nonzero()[0])
            raise ValueError(f"routing.topk_ids: token {t} lists an expert twice: {r.topk_ids[t].tolist()}")
        if not bool(torch.isfinite(r.topk_weights).all()):
            raise ValueError("routing.topk_weights contains non-finite values")
    if r.logits is not None and tuple(r.logits.shape) != (num_tokens, num_experts):
        raise ValueError(f"routing.logits must be [T, E] = [{num_tokens}, {num_experts}], "
                         f"got {tuple(r.logits.shape)}")


def check_x2d(x: torch.Tensor, d_model: int, name: str = "x") -> None:
    """x must be a floating [T, D] tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != d_model:
        raise ValueError(f"{name} must be [T, D] with D={d_model}, got shape {tuple(x.shape)}")


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool = True,
          scoring: str = "softmax") -> Routing:
    """Route each row of x [T, D] to its top-k experts with router_weight [E, D]."""
    if not isinstance(router_weight, torch.Tensor) or router_weight.dim() != 2:
        raise ValueError("router_weight must be a [E, D] tensor")
    E, D = router_weight.shape
    check_x2d(x, D)
    check_top_k(top_k, E)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if x.dtype != router_weight.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match router_weight dtype {router_weight.dtype}")
    if x.device != router_weight.device:
        raise ValueError(f"x is on {x.device} but router_weight is on {router_weight.device}")
    logits = (x @ router_weight.t()).float()  # [T, E], matmul in x's dtype, scores in fp32
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(-1).nonzero()[0])
        raise ValueError(f"router logits are not finite (first bad token: {bad}); check x for NaN/inf")
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)  # [T, E]
    w, ids = torch.topk(scores, top_k, dim=-1)  # [T, K] each, sorted by score
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return Routing(topk_ids=ids, topk_weights=w, logits=logits)


# ----------------------------------------------------------------------------- node-limited routing
def node_limited_topk(scores: torch.Tensor, top_k: int, *, num_nodes: int, max_nodes: int,
                      node_score_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of scores [T, E] restricted to at most `max_nodes` (M) of `num_nodes` (N) nodes per token.

    Experts sit on nodes in contiguous blocks of En = E / N (expert parallelism's placement: node n holds
    experts [n*En, (n+1)*En)). Each node is scored by the sum of its top-j expert scores, j = node_score_k
    (default min(2, En): DeepSeek-V3's top-2 per group); the M best nodes are kept (ties broken as torch.topk does)
    and the token's K experts are the top-k of the scores on the kept nodes. Returns (weights [T, K] — the
    unmasked scores of the chosen experts —, ids [T, K]), sorted by score like torch.topk.
    M = N keeps every node: exactly torch.topk(scores, K).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.dtype.is_floating_point:
        got = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(f"scores must be a floating [T, E] tensor, got {got}")
    T, E = scores.shape
    check_top_k(top_k, E)
    N = check_int("num_nodes", num_nodes, 1)
    if E % N:
        raise ValueError(f"num_experts={E} is not divisible by num_nodes={N}: nodes hold equal blocks of experts")
    M = check_int("max_nodes", max_nodes, 1, N)
    En = E // N
    if top_k > M * En:
        raise ValueError(f"top_k={top_k} experts do not fit on max_nodes={M} nodes of E/N={En} experts each")
    j = min(2, En) if node_score_k is None else check_int("node_score_k", node_score_k, 1, En)
    if M == N:
        return torch.topk(scores, top_k, dim=-1)
    node_scores = scores.view(T, N, En).topk(j, dim=-1).values.sum(-1)  # [T, N]
    keep = node_scores.topk(M, dim=-1).indices  # [T, M]
    mask = torch.zeros(T, N, dtype=torch.bool, device=scores.device).scatter_(1, keep, True)  # [T, N]
    masked = scores.masked_fill(~mask.repeat_interleave(En, dim=1), float("-inf"))  # [T, E]
    ids = torch.topk(masked, top_k, dim=-1).indices  # [T, K]
    return scores.gather(1, ids), ids


def node_limited_routing(logits: torch.Tensor, top_k: int, *, num_nodes: int, max_nodes: int,
                         renormalize: bool = True, scoring: str = "softmax",
                         node_score_k: int | None = None) -> Routing:
    """The router's rule on given logits [T, E], with each token's K experts on at most max_nodes nodes.

    Scores are softmax (or sigmoid) over all E experts, as in `route`; node_limited_topk picks the experts;
    the weights are their scores, renormalised to sum 1 when asked. Logits are kept in the Routing.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [T, E] tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    logits = logits.float()  # [T, E]
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)  # [T, E]
    w, ids = node_limited_topk(scores, top_k, num_nodes=num_nodes, max_nodes=max_nodes, node_score_k=node_score_k)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return Routing(topk_ids=ids, topk_weights=w, logits=logits)


def route_node_limited(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, *, num_nodes: int,
                       max_nodes: int, renormalize: bool = True, scoring: str = "softmax",
                       node_score_k: int | None = None) -> Routing:
    """`route`, with each token's K experts on at most max_nodes of num_nodes nodes (node_limited_topk).

    x [T, D], router_weight [E, D]. max_nodes = num_nodes gives exactly route(x, router_weight, top_k, ...).
    """
    if not isinstance(router_weight, torch.Tensor) or router_weight.dim() != 2:
        raise ValueError("router_weight must be a [E, D] tensor")
    check_x2d(x, router_weight.shape[1])
    if x.dtype != router_weight.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match router_weight dtype {router_weight.dtype}")
    if x.device != router_weight.device:
        raise ValueError(f"x is on {x.device} but router_weight is on {router_weight.device}")
    logits = (x @ router_weight.t()).float()  # [T, E]
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        raise ValueError("router logits are not finite; check x for NaN/inf")
    return node_limited_routing(logits, top_k, num_nodes=num_nodes, max_nodes=max_nodes, renormalize=renormalize,
                                scoring=scoring, node_score_k=node_score_k)
