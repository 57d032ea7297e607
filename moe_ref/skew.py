"""Realistic imbalanced routing for experiments: a Zipf-like expert popularity with a `skew` knob.

Legend: T tokens, D d_model, E experts, K top-k.

Real routers are not uniform: a few experts are "hot" and take a large share of the tokens.
This module makes that reproducible with one number, `skew` (>= 0):

  popularity p_e ∝ 1 / rank_e ** skew      (Zipf; skew=0 is uniform, skew=1 classic Zipf)

Two ways to turn a popularity into a Routing:

- `skewed_routing(x, router_weight, ...)`: the real router, plus a bias `log p_e` added to its
  logits. softmax(l + log p) ∝ p_e * exp(l_e), so each token still prefers the experts its own
  logits favour, but an expert's share of tokens grows with its popularity. The biased logits are
  kept in the Routing, so overflow="reroute" sees the same probabilities that made the choice.
- `random_routing(T, E, K, skew)`: no layer at all. Each token draws K distinct experts from p
  without replacement (Gumbel-top-k: top-k of log p + Gumbel noise); those noisy scores are
  the Routing's logits and the gate weights are their softmax over the K chosen, renormalised.

`seed` makes everything deterministic. In `skewed_routing`, `expert_popularity` and
`random_routing`, `hot_seed` (default None) decides which experts are hot: None keeps expert 0 the
most popular, expert E-1 the least; an int shuffles the ranks with that seed.
"""

from __future__ import annotations

import torch

from .config import SCORINGS, check_top_k
from .router import Routing, check_x2d
from .validate import check_int, check_number

__all__ = ["expert_popularity", "routing_from_logits", "skewed_routing", "random_routing"]


def expert_popularity(num_experts: int, skew: float, hot_seed: int | None = None) -> torch.Tensor:
    """[E] float64 probabilities p_e ∝ rank_e ** -skew (sum 1). skew=0: uniform 1/E.

    hot_seed=None: rank_e = e + 1 (expert 0 hottest); an int shuffles which expert gets which rank.
    """
    E = check_int("num_experts", num_experts, 1)
    s = check_number("skew", skew, 0)
    p = torch.arange(1, E + 1, dtype=torch.float64) ** -s  # [E], by rank
    p = p / p.sum()
    if hot_seed is not None:
        perm = torch.randperm(E, generator=torch.Generator().manual_seed(int(hot_seed)))
        p = p[perm]
    return p


def routing_from_logits(logits: torch.Tensor, top_k: int, renormalize: bool = True,
                        scoring: str = "softmax") -> Routing:
    """The router's rule applied to given logits [T, E]: score, top-k, optional renormalisation."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [T, E] tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    check_top_k(top_k, logits.shape[1])
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    logits = logits.float()  # [T, E]
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)  # [T, E]
    w, ids = torch.topk(scores, top_k, dim=-1)  # [T, K]
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return Routing(topk_ids=ids, topk_weights=w, logits=logits)


def skewed_routing(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, skew: float,
                   renormalize: bool = True, scoring: str = "softmax", seed: int = 0,
                   hot_seed: int | None = None) -> Routing:
    """Route x [T, D] with router_weight [E, D], biasing logits by log popularity (see module doc).

    Returns a Routing whose logits [T, E] are the biased ones (so reroute uses them).
    skew=0 adds nothing: the result equals moe_ref.route(x, router_weight, top_k, ...).
    `seed` is accepted for a uniform signature with random_routing; this function is deterministic
    in x (no randomness is drawn); hot_seed picks the hot experts.
    """
    if not isinstance(router_weight, torch.Tensor) or router_weight.dim() != 2:
        raise ValueError("router_weight must be a [E, D] tensor")
    E, D = router_weight.shape
    check_x2d(x, D)
    if x.dtype != router_weight.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match router_weight dtype {router_weight.dtype}")
    bias = expert_popularity(E, skew, hot_seed).log().float().to(x.device)  # [E]
    logits = (x @ router_weight.t()).float() + bias  # [T, E]
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        raise ValueError("router logits are not finite; check x for NaN/inf")
    return routing_from_logits(logits, top_k, renormalize, scoring)


def random_routing(num_tokens: int, num_experts: int, top_k: int, skew: float = 0.0, seed: int = 0,
                   hot_seed: int | None = None, renormalize: bool = True) -> Routing:
    """A Routing for T tokens with no layer: K distinct experts per token drawn from the popularity.

    Gumbel-top-k: logits = log p + Gumbel(0, 1) noise [T, E]; ids = top-k of logits (a sample of K
    experts without replacement, each draw ∝ p); weights = softmax(logits) over the K chosen,
    renormalised to sum 1 (renormalize=False keeps the softmax-over-E values). Logits are kept.
    """
    T = check_int("num_tokens", num_tokens, 0)
    E = check_int("num_experts", num_experts, 1)
    check_top_k(top_k, E)
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(T, E, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)  # [T, E]
    gumbel = -torch.log(-torch.log(u))  # [T, E]
    logits = (expert_popularity(E, skew, hot_seed).log() + gumbel).float()  # [T, E]
    return routing_from_logits(logits, top_k, renormalize, "softmax")
