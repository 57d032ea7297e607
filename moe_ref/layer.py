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
from .config import CapacityConfig, MoEConfig, check_capacity
from .packing import packed_for, prepack, unpack
from .permute import combine_dtype
from .router import Routing, check_x2d, route, validate_routing
from .stats import MoEStats, expert_counts
from .strategy import get_strategy
from .validate import check_float_dtype, check_instance


@dataclass
class MoEOutput:
    """What MoELayer.__call__ returns: the layer output and the cost counters of that call."""

    output: torch.Tensor  # same shape and dtype as the input
    stats: MoEStats


def init_weights(cfg: MoEConfig, seed: int = 0, device=None, dtype: torch.dtype = torch.float32
                 ) -> dict[str, torch.Tensor]:
    """Scaled-normal weights drawn on `device` (default CPU) from one seeded generator, then cast to dtype.

    The same seed gives the same numbers on the CPU whatever the dtype; another device type draws from its
    own generator (other numbers, same distribution), so large layers never pass through host memory.
    The meta device gives shapes only (nothing allocated).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    g = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    E, D, F = cfg.num_experts, cfg.d_model, cfg.d_ff
    out = {}
    for name, size, fan_in in (("router_weight", (E, D), D), ("w13", (E, 2 * F, D), D), ("w2", (E, D, F), F)):
        w = torch.randn(size, generator=g, device=device)  # fp32: [E, D] / [E, 2F, D] / [E, D, F]
        out[name] = w.div_(fan_in**0.5).to(dtype)
        del w
    return out


def check_layer_weights(cfg: MoEConfig, router_weight, w13, w2) -> None:
    """router_weight [E, D], w13 [E, 2F, D], w2 [E, D, F]: floating tensors of one dtype on one device."""
    c = cfg
    want = {"router_weight": (c.num_experts, c.d_model), "w13": (c.num_experts, 2 * c.d_ff, c.d_model),
            "w2": (c.num_experts, c.d_model, c.d_ff)}
    got = {"router_weight": router_weight, "w13": w13, "w2": w2}
    for name, w in got.items():
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
        check_float_dtype(f"{name}.dtype", w.dtype)
        if tuple(w.shape) != want[name]:
            raise ValueError(f"{name} must be {list(want[name])} for D={c.d_model}, F={c.d_ff}, "
                             f"E={c.num_experts}, got {list(w.shape)}")
    if len({w.dtype for w in got.values()}) > 1 or len({w.device for w in got.values()}) > 1:
        raise TypeError("router_weight, w13 and w2 must share one dtype and device, got "
                        + ", ".join(f"{n}: {w.dtype} on {w.device}" for n, w in got.items()))


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
    """A sparse MoE block: router_weight [E, D], w13 [E, 2F, D], w2 [E, D, F] (SwiGLU experts).

    MoELayer(cfg, dtype, device, seed) draws random weights on `device` (init_weights);
    MoELayer.from_weights(cfg, router_weight, w13, w2) holds given tensors.
    """

    def __init__(self, cfg: MoEConfig, dtype: torch.dtype = torch.float32, device=None, seed: int = 0, *,
                 weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        check_instance("cfg", cfg, MoEConfig)
        if weights is None:
            check_float_dtype("dtype", dtype)
            w = init_weights(cfg, seed, device=device, dtype=dtype)
            weights = (w["router_weight"], w["w13"], w["w2"])
        check_layer_weights(cfg, *weights)
        self.cfg = cfg
        for name, w in zip(("router_weight", "w13", "w2"), weights):
            self.register_parameter(name, nn.Parameter(w, requires_grad=False))  # no copy

    @classmethod
    def from_weights(cls, cfg: MoEConfig, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, *,
                     dtype: torch.dtype | None = None, device=None) -> MoELayer:
        """A layer holding router_weight [E, D], w13 [E, 2F, D], w2 [E, D, F] (rows 0..F-1 of w13 the gate).

        The tensors are used as they are (no copy) unless `dtype` or `device` asks for a conversion;
        they must share one dtype and device.
        """
        ws = (router_weight, w13, w2)
        if dtype is not None or device is not None:
            if dtype is not None:
                check_float_dtype("dtype", dtype)
            ws = tuple(w.to(dtype=dtype, device=device) if isinstance(w, torch.Tensor) else w for w in ws)
        return cls(cfg, weights=ws)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"D={c.d_model}, F={c.d_ff}, E={c.num_experts}, K={c.top_k}, renormalize={c.renormalize}"

    def prepack(self, tune: bool = True) -> MoELayer:
        """Pack the expert weights once for the grouped strategy's CPU GEMMs (moe_ref.packing); returns self.

        Costs a second copy of w13 and w2 (oneDNN's blocked layout) and, with tune (the default), a moment of timing:
        the plain and packed GEMMs are timed on each weight at a few row counts and the faster is used per row
        count (`gemm_choices()` shows the choice; tune=False: always the packed copy). A change to the weights made
        in place afterwards makes the copy stale: the next call warns and uses the plain weights, unless the
        change went through `.data`, which nothing can see: call prepack() again after changing the weights.
        ValueError where the weights cannot be packed (not on the CPU, not float32/bfloat16, no oneDNN).
        """
        prepack(self.w13, self.w2, tune=tune)
        return self

    def gemm_choices(self) -> dict[str, dict]:
        """{"w13": ..., "w2": ...}: per timed row count, the GEMM method prepack() chose and the medians it saw
        (cpu_gemm.GemmChoice.as_dict); {} when the layer is not prepacked."""
        p13, p2 = packed_for(self.w13), packed_for(self.w2)
        return {} if p13 is None or p2 is None else {"w13": p13.choice.as_dict(), "w2": p2.choice.as_dict()}

    def unpack(self) -> MoELayer:
        """Drop the packed copies prepack() made (the plain weights are used again); returns self."""
        unpack(self.w13, self.w2)
        return self

    @property
    def prepacked(self) -> bool:
        """True while both expert weights have fresh packed copies (prepack(), weights unchanged since)."""
        return packed_for(self.w13) is not None and packed_for(self.w2) is not None

    def route(self, x2d: torch.Tensor) -> Routing:
        """Routing for x2d [T, D] with this layer's router."""
        c = self.cfg
        return route(x2d, self.router_weight, c.top_k, renormalize=c.renormalize, scoring=c.scoring)

    def _check_input(self, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        """x [..., D] in the layer's dtype and on its device -> x2d [T, D]; a given routing must fit it."""
        c = self.cfg
        check_instance("x", x, torch.Tensor)
        if x.dim() < 1 or x.shape[-1] != c.d_model:
            raise ValueError(f"x must be [..., D] with D={c.d_model}, got shape {tuple(x.shape)}")
        x2d = x.reshape(-1, c.d_model)  # [T, D]
        check_x2d(x2d, c.d_model)
        if x.dtype != self.w13.dtype:
            raise TypeError(f"x dtype {x.dtype} does not match the layer's dtype {self.w13.dtype}; "
                            f"use layer.to({x.dtype}) or x.to({self.w13.dtype})")
        if x.device != self.w13.device:
            raise ValueError(f"x is on {x.device} but the layer is on {self.w13.device}")
        if routing is not None:
            validate_routing(routing, x2d.shape[0], c.num_experts)
            if routing.topk_ids.device != x.device:
                raise ValueError(f"routing is on {routing.topk_ids.device} but x is on {x.device}")
        return x2d

    def forward(self, x: torch.Tensor, strategy: str = "grouped", routing: Routing | None = None,
                capacity: CapacityConfig | None = None) -> MoEOutput:
        """x [..., D] -> MoEOutput(output [..., D], stats), by `strategy`, with the router unless `routing`."""
        c = self.cfg
        get_strategy(strategy)  # unknown names fail first, even for empty input
        check_capacity(capacity)
        x2d = self._check_input(x, routing)
        if routing is None:
            routing = self.route(x2d)
        if x2d.shape[0] == 0:
            stats = MoEStats(expert_counts=torch.zeros(c.num_experts, dtype=torch.long, device=x.device),
                             capacity=None, passes=0)
            return MoEOutput(torch.zeros_like(x), stats)
        out = moe_forward(x2d, routing, self.w13, self.w2, strategy=strategy, capacity=capacity,
                          scoring=c.scoring)
        return MoEOutput(out.output.view(x.shape), out.stats)
