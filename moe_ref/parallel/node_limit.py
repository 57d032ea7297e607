"""What node-limited routing saves in inter-node traffic and what it costs in output quality.

Legend: T tokens, D d_model, E experts, K top-k, P ranks = N nodes × L ranks per node, M max nodes per
token, En = E / N experts per node. Routing rule: moe_ref.router.node_limited_routing (top-2 node scores).

- `node_span`: how many nodes each token's K experts lie on (<= M under the rule).
- `node_limited_row`: one layer's input x: the inter-node token bytes of the flat and the hierarchical
  all-to-all (metered by simulate_ep), unrestricted against node-limited, and the output error
  ||y_M - y|| / ||y|| of the layer (moe_forward) against unrestricted routing.
- `tiny_node_limited_table`: the same on every MoE layer of the trained tiny model (its real block inputs
  over held-out text), and `tiny_node_limited_loss`: the model's held-out loss and next-token agreement
  with node-limited gates against the unrestricted model (transformers is imported only here).
"""

from __future__ import annotations

import torch

from ..layer import moe_forward
from ..metrics import relative_error
from ..router import Routing, node_limited_routing
from ..validate import check_int
from .simulate import simulate_ep
from .topology import Topology, inter_node_bytes

__all__ = ["node_span", "node_limited_row", "tiny_block_inputs", "tiny_node_limited_table", "tiny_node_limited_loss"]


def node_span(routing: Routing, num_experts: int, num_nodes: int) -> torch.Tensor:
    """[T] number of distinct nodes each token's (kept) experts lie on; experts in contiguous node blocks."""
    N = check_int("num_nodes", num_nodes, 1)
    if num_experts % N:
        raise ValueError(f"num_experts={num_experts} is not divisible by num_nodes={N}")
    ids = routing.topk_ids  # [T, K]
    node = torch.where(ids >= 0, ids // (num_experts // N), N)  # [T, K]
    hit = torch.zeros(ids.shape[0], N + 1, dtype=torch.long).scatter_(1, node.cpu(), 1)[:, :N]
    return hit.sum(1)


def node_limited_row(x: torch.Tensor, layer, num_nodes: int, ranks_per_node: int, max_nodes: int,
                     routing: Routing | None = None) -> dict:
    """One layer (an MoELayer: router_weight, w13, w2, cfg) on x [T, D]: traffic and error under the limit.

    routing: the unrestricted routing (default layer.route(x)); its logits give the node-limited one.
    Bytes are token rows of x's dtype, dispatch + combine, between distinct nodes.
    """
    N, L = check_int("num_nodes", num_nodes, 1), check_int("ranks_per_node", ranks_per_node, 1)
    P, E, K = N * L, layer.cfg.num_experts, layer.cfg.top_k
    topo = Topology(N, L)
    full = layer.route(x) if routing is None else routing
    limited = node_limited_routing(full.logits, K, num_nodes=N, max_nodes=max_nodes,
                                   renormalize=layer.cfg.renormalize)
    row = dict(nodes=N, ranks_per_node=L, max_nodes=max_nodes, tokens=x.shape[0], experts=E, top_k=K)
    outs = {}
    for name, r in (("full", full), ("limited", limited)):
        for scheme in ("grouped", "hierarchical"):
            sim = simulate_ep(x, r, layer.w13, layer.w2, P, scheme=scheme, ranks_per_node=L)
            key = "flat" if scheme == "grouped" else "hier"
            row[f"inter_{key}_{name}"] = inter_node_bytes(sim.traffic_bytes["tokens"], topo)
            outs[name] = sim.output
        row[f"span_{name}"] = float(node_span(r, E, N).double().mean()) if r.num_tokens else 0.0
    with torch.inference_mode():
        y_full = moe_forward(x, full, layer.w13, layer.w2).output
    torch.testing.assert_close(outs["full"], y_full, rtol=1e-4, atol=1e-5)  # the EP run is the layer
    row["rel_error"] = relative_error(outs["limited"], y_full)
    changed = (limited.topk_ids.sort(-1).values != full.topk_ids.sort(-1).values).any(-1)
    row["tokens_rerouted"] = float(changed.double().mean()) if changed.numel() else 0.0
    for key in ("flat", "hier"):
        f, lim = row[f"inter_{key}_full"], row[f"inter_{key}_limited"]
        row[f"saving_{key}"] = 1.0 - lim / f if f else 0.0
    return row


def tiny_block_inputs(model=None, num_tokens: int = 1024) -> list[tuple[object, torch.Tensor]]:
    """(MoELayer from the block, its input x [T, D]) for every MoE layer of the tiny model on held-out text."""
    from ..hf import from_hf, is_sparse_moe_block
    from ..tiny import heldout_ids, load_tiny_moe

    model = load_tiny_moe() if model is None else model
    blocks = [m for m in model.modules() if is_sparse_moe_block(m)]
    seen: list[torch.Tensor | None] = [None] * len(blocks)
    hooks = [b.gate.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(
        i, args[0].detach().reshape(-1, args[0].shape[-1]).float())) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=heldout_ids(num_tokens).to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return [(from_hf(b), x) for b, x in zip(blocks, seen)]


def tiny_node_limited_table(max_nodes=(1,), num_nodes: int = 2, ranks_per_node: int = 2, num_tokens: int = 1024,
                            model=None) -> list[dict]:
    """node_limited_row for every MoE layer of the tiny model and every M in max_nodes (rows: layer, ...)."""
    rows = []
    for i, (layer, x) in enumerate(tiny_block_inputs(model, num_tokens)):
        full = layer.route(x)
        for M in max_nodes:
            rows.append(dict(layer=i, **node_limited_row(x, layer, num_nodes, ranks_per_node, M, full)))
    return rows


@torch.no_grad()
def tiny_node_limited_loss(num_nodes: int = 2, max_nodes: int = 1, model=None, batch_size: int = 4,
                           seq_len: int = 256) -> dict:
    """Held-out loss (nats/byte) with every gate node-limited, the unrestricted loss, and next-token agreement.

    The gates' outputs (logits, top-k weights, top-k ids) are replaced by node_limited_routing of the same
    logits (forward hooks), so the model runs its own experts on the restricted choice.
    """
    import torch.nn.functional as Fn

    from ..hf import _routing_rule, is_sparse_moe_block
    from ..tiny import heldout_windows, load_tiny_moe

    model = load_tiny_moe() if model is None else model
    ids = heldout_windows(batch_size, seq_len + 1).to(model.device)  # [B, S + 1]
    inputs, labels = ids[:, :-1], ids[:, 1:]
    base = model(input_ids=inputs).logits  # [B, S, V]
    hooks = []
    for block in (m for m in model.modules() if is_sparse_moe_block(m)):
        k, renorm = _routing_rule(block)

        def hook(mod, args, out, k=k, renorm=renorm):
            r = node_limited_routing(out[0], k, num_nodes=num_nodes, max_nodes=max_nodes, renormalize=renorm)
            return out[0], r.topk_weights.to(out[1].dtype), r.topk_ids

        hooks.append(block.gate.register_forward_hook(hook))
    try:
        lim = model(input_ids=inputs).logits
    finally:
        for h in hooks:
            h.remove()

    def loss(lg):
        return float(Fn.cross_entropy(lg.flatten(0, 1).float(), labels.flatten()))

    return dict(nodes=num_nodes, max_nodes=max_nodes, tokens=labels.numel(), loss_full=loss(base),
                loss_limited=loss(lim), agreement=float((lim.argmax(-1) == base.argmax(-1)).float().mean()))
