"""MoELayer: router + E SwiGLU experts, computed by any registered strategy.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, C capacity per expert.
forward(x [..., D], strategy, routing=None, capacity=None) -> MoEOutput(output [..., D], stats).
Pipeline: route (or take the given Routing) -> apply capacity (drop / reroute / spill / error) ->
strategy computes each pass -> outputs of the passes are summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import grouped, naive, padded  # noqa: F401  (register the built-in strategies)
from .capacity import apply_capacity
from .config import CapacityConfig, MoEConfig
from .permute import combine_dtype
from .router import Routing, check_x2d, route, validate_routing
from .stats import MoEStats, expert_counts
from .strategy import get_strategy


@dataclass
class MoEOutput:
    """What MoELayer.__call__ returns: the layer output and the cost counters of that call."""

    output: torch.Tensor  # same shape and dtype as the input
    stats: MoEStats


def init_weights(cfg: MoEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic float32 CPU weights (same numbers on every device): scaled normal init."""
    g = torch.Generator().manual_seed(seed)
    E, D, F = cfg.num_experts, cfg.d_model, cfg.d_ff
    return {
        "router_weight": torch.randn(E, D, generator=g) / D**0.5,  # [E, D]
        "w13": torch.randn(E, 2 * F, D, generator=g) / D**0.5,  # [E, 2F, D]
        "w2": torch.randn(E, D, F, generator=g) / F**0.5,  # [E, D, F]
    }


def moe_forward(x: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor, *,
                strategy: str = "grouped", capacity: CapacityConfig | None = None,
                scoring: str = "softmax") -> MoEOutput:
    """Functional core of MoELayer.forward for x [T, D] and a validated Routing."""
    fn = get_strategy(strategy)
    E = w13.shape[0]
    counts = expert_counts(routing.topk_ids, E)  # [E] before capacity
    cap = apply_capacity(routing, E, capacity, scoring)
    y = None
    computed = padded_slots = 0
    for r in cap.passes:
        res = fn(x, r, w13, w2, capacity=cap.capacity)
        computed += res.computed_rows
        padded_slots += res.padded_slots
        y = res.y if y is None else y + res.y.to(y.dtype)
        if len(cap.passes) > 1 and y.dtype != combine_dtype(x.dtype):
            y = y.to(combine_dtype(x.dtype))  # accumulate spill passes in fp32
    stats = MoEStats(expert_counts=counts, capacity=cap.capacity, dropped=cap.dropped,
                     dropped_tokens=cap.dropped_tokens, rerouted=cap.rerouted, passes=len(cap.passes),
                     padded_slots=padded_slots, computed_rows=computed)
    return MoEOutput(y.to(x.dtype), stats)


class MoELayer(nn.Module):
    """A sparse MoE block: router_weight [E, D], w13 [E, 2F, D], w2 [E, D, F] (SwiGLU experts)."""

    def __init__(self, cfg: MoEConfig, dtype: torch.dtype = torch.float32, device=None, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a moe_ref.MoEConfig, got {type(cfg).__name__}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.cfg = cfg
        for name, w in init_weights(cfg, seed).items():
            self.register_parameter(name, nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False))

    @classmethod
    def from_hf(cls, block: nn.Module, **kwargs):
        """Convert a transformers sparse-MoE block (Mixtral, Qwen2/3-MoE, OLMoE); see moe_ref.hf.from_hf."""
        from .hf import from_hf  # lazy: `import moe_ref` never imports transformers

        return from_hf(block, **kwargs)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"D={c.d_model}, F={c.d_ff}, E={c.num_experts}, K={c.top_k}, renormalize={c.renormalize}"

    def route(self, x2d: torch.Tensor) -> Routing:
        """Routing for x2d [T, D] with this layer's router."""
        c = self.cfg
        return route(x2d, self.router_weight, c.top_k, renormalize=c.renormalize, scoring=c.scoring)

    def forward(self, x: torch.Tensor, strategy: str = "grouped", routing: Routing | None = None,
                capacity: CapacityConfig | None = None) -> MoEOutput:
        c = self.cfg
        get_strategy(strategy)  # unknown names fail first, even for empty input
        if capacity is not None and not isinstance(capacity, CapacityConfig):
            raise TypeError(f"capacity must be a moe_ref.CapacityConfig or None, got {type(capacity).__name__}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != c.d_model:
            raise ValueError(f"x must be [..., D] with D={c.d_model}, got shape {tuple(x.shape)}")
        x2d = x.reshape(-1, c.d_model)  # [T, D]
        check_x2d(x2d, c.d_model)
        if x.dtype != self.w13.dtype:
            raise TypeError(f"x dtype {x.dtype} does not match the layer's dtype {self.w13.dtype}; "
                            f"use layer.to({x.dtype}) or x.to({self.w13.dtype})")
        if x.device != self.w13.device:
            raise ValueError(f"x is on {x.device} but the layer is on {self.w13.device}")
        if routing is None:
            routing = self.route(x2d)
        else:
            validate_routing(routing, x2d.shape[0], c.num_experts)
            if routing.topk_ids.device != x.device:
                raise ValueError(f"routing is on {routing.topk_ids.device} but x is on {x.device}")
        if x2d.shape[0] == 0:
            stats = MoEStats(expert_counts=torch.zeros(c.num_experts, dtype=torch.long, device=x.device),
                             capacity=None, passes=0)
            return MoEOutput(torch.zeros_like(x), stats)
        out = moe_forward(x2d, routing, self.w13, self.w2, strategy=strategy, capacity=capacity,
                          scoring=c.scoring)
        return MoEOutput(out.output.view(x.shape), out.stats)
