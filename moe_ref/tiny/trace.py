"""Real routing traces: the per-layer Routing of the trained model over held-out text, and how they look.

Legend: B batch, S sequence, T = B*S tokens, E experts, K top-k, L MoE layers.
Forward hooks on each sparse-MoE block's router (`block.gate`, MixtralTopKRouter in transformers 5.x,
which returns (router_logits [T, E], top-k weights [T, K], top-k ids [T, K])) record what the model chose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from ..metrics import load_imbalance
from ..router import Routing
from ..stats import expert_counts

__all__ = ["batch_imbalance", "layer_loads", "neighbour_sharing", "routing_traces"]


def _to_routing(out, top_k: int) -> Routing:
    """A router module's output -> Routing; a bare logits tensor (transformers 4.x) is routed softmax -> top-k."""
    if isinstance(out, tuple) and len(out) == 3:
        logits, weights, ids = out  # [T, E], [T, K], [T, K]
        return Routing(topk_ids=ids.detach().long(), topk_weights=weights.detach().float(),
                       logits=logits.detach().float())
    logits = out.detach().float()  # [T, E]
    w, ids = torch.topk(Fn.softmax(logits, dim=-1), top_k, dim=-1)  # [T, K]
    return Routing(topk_ids=ids, topk_weights=w / w.sum(-1, keepdim=True), logits=logits)


@torch.no_grad()
def routing_traces(input_ids: torch.Tensor | None = None, model=None, num_tokens: int = 2048) -> list[Routing]:
    """Per-layer Routing (ids [T, K], weights [T, K], logits [T, E]) of `model` over input_ids [B, S].

    Defaults: the shipped tiny model (load_tiny_moe) over heldout_ids(num_tokens). Tokens are flattened
    batch-major (T = B*S, token t = b*S + s), as the MoE blocks see them; one Routing per MoE layer, in order.
    """
    from ..hf import is_sparse_moe_block
    from .data import heldout_ids
    from .model import load_tiny_moe

    model = load_tiny_moe() if model is None else model
    input_ids = heldout_ids(num_tokens) if input_ids is None else input_ids
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor [B, S]")
    blocks = [m for m in model.modules() if is_sparse_moe_block(m)]
    if not blocks:
        raise ValueError(f"model has no supported sparse-MoE block ({type(model).__name__})")
    traces: list[Routing | None] = [None] * len(blocks)
    hooks = []
    for i, block in enumerate(blocks):
        k = int(getattr(block.gate, "top_k", None) or block.top_k)

        def hook(module, args, out, i=i, k=k):
            traces[i] = _to_routing(out, k)

        hooks.append(block.gate.register_forward_hook(hook))
    try:
        model(input_ids=input_ids.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return traces


def layer_loads(traces: list[Routing], num_experts: int) -> torch.Tensor:
    """Expert loads per layer -> int64 [L, E] (assignments routed to each expert)."""
    if not traces:
        raise ValueError("traces must be a non-empty list of Routing")
    return torch.stack([expert_counts(r.topk_ids, num_experts) for r in traces])


def neighbour_sharing(routing: Routing, num_experts: int, seq_len: int | None = None) -> dict:
    """How often consecutive tokens t, t+1 share experts, against independent uniform routing.

    Returns {"any": share of pairs with at least one expert in common, "top1": same first choice,
    "any_uniform", "top1_uniform": the same for independent uniform top-K choices}. seq_len: pairs
    that cross a sequence boundary (token t = b*S + s) are left out.
    """
    ids = routing.topk_ids  # [T, K]
    T, K = ids.shape
    if T < 2 or not 1 <= K <= num_experts:
        raise ValueError(f"routing must have >= 2 tokens and K <= num_experts, got T={T}, K={K}, E={num_experts}")
    a, b = ids[:-1], ids[1:]  # [T-1, K]
    keep = torch.ones(T - 1, dtype=torch.bool)
    if seq_len is not None:
        keep = (torch.arange(1, T) % seq_len) != 0  # pair (t, t+1) inside one sequence
    common = (a[:, :, None] == b[:, None, :]).any(-1).any(-1)[keep]  # [pairs]
    top1 = (a[:, 0] == b[:, 0])[keep]
    none_shared = 1.0
    for j in range(K):  # P(a random K-set misses a given K-set) = C(E-K, K) / C(E, K)
        none_shared *= (num_experts - K - j) / (num_experts - j)
    return dict(any=float(common.float().mean()), top1=float(top1.float().mean()),
                any_uniform=1.0 - max(0.0, none_shared), top1_uniform=1.0 / num_experts)


def batch_imbalance(routing: Routing, sizes, num_experts: int, trials: int = 20, contiguous: bool = True,
                    seed: int = 0) -> dict:
    """{T: [max/mean expert load of `trials` batches of T tokens taken from a trace]} (as imbalance_samples).

    contiguous=True: each batch is T consecutive tokens (one long request); False: T tokens drawn at random
    positions without replacement (many short requests batched together).
    """
    n = routing.topk_ids.shape[0]
    if any(not isinstance(T, int) or not 1 <= T <= n for T in sizes):
        raise ValueError(f"sizes must be ints in [1, {n}] (the trace's tokens), got {list(sizes)}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for T in sizes:
        out[T] = []
        for _ in range(trials):
            if contiguous:
                start = int(torch.randint(0, n - T + 1, (1,), generator=g))
                idx = torch.arange(start, start + T)  # [T]
            else:
                idx = torch.randperm(n, generator=g)[:T]  # [T]
            out[T].append(load_imbalance(expert_counts(routing.topk_ids[idx], num_experts)))
    return out
