"""Hugging Face transformers interop: convert sparse-MoE blocks and patch whole models.

Legend: T tokens, D d_model, F d_ff per expert, Fs d_ff of a shared expert, E experts, K top-k.
Supported blocks (transformers 5.x, experts fused as 3-D tensors; per-expert ModuleLists of 4.x too):
  MixtralSparseMoeBlock   softmax -> top-k -> renormalise (always)
  Qwen2MoeSparseMoeBlock  softmax -> top-k -> renormalise if norm_topk_prob; plus a shared expert
                          scaled by sigmoid(x @ shared_expert_gate^T), added to the routed output
  Qwen3MoeSparseMoeBlock  softmax -> top-k -> renormalise if norm_topk_prob
  OlmoeSparseMoeBlock     softmax -> top-k -> renormalise if norm_topk_prob
Weight layout in transformers 5.x: experts.gate_up_proj [E, 2F, D] (gate rows first, then up) and
experts.down_proj [E, D, F]: exactly moe_ref's w13 and w2, so conversion is a (shared or copied) view.

from_hf(block)            -> MoELayer (or SharedExpertMoE for Qwen2-MoE) whose output equals the block's.
patch_model(model, ...)   -> PatchReport: every sparse-MoE block swapped for a moe_ref-backed module
                             with the same forward interface; per-layer routing statistics collected.
(transformers' own experts implementations, timed as benchmark peers, live in moe_ref.bench.providers.)
This module imports transformers only inside functions that need it: `import moe_ref` never does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as Fn
from torch import nn

from .config import CapacityConfig, MoEConfig, check_capacity
from .layer import MoELayer, MoEOutput
from .router import Routing
from .stats import MoEStats
from .strategy import get_strategy

__all__ = [
    "SUPPORTED_BLOCKS", "HFMoEBlock", "LayerStats", "PatchReport", "SharedExpertMoE",
    "from_hf", "is_sparse_moe_block", "patch_model",
]

# class name -> does the block carry a gated shared expert
SUPPORTED_BLOCKS = {
    "MixtralSparseMoeBlock": False,
    "Qwen2MoeSparseMoeBlock": True,
    "Qwen3MoeSparseMoeBlock": False,
    "OlmoeSparseMoeBlock": False,
}


def is_sparse_moe_block(module: nn.Module) -> bool:
    """True for the sparse-MoE blocks from_hf can convert (matched by class name, see SUPPORTED_BLOCKS)."""
    return type(module).__name__ in SUPPORTED_BLOCKS


# ----------------------------------------------------------------------------------------- conversion

def _expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2F, D], w2 [E, D, F]) from a transformers experts module, as views where possible."""
    if hasattr(experts, "gate_up_proj"):  # transformers 5.x: fused 3-D tensors
        if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
            raise TypeError("experts with biases are not supported (moe_ref experts are bias-free SwiGLU)")
        gu, dp = experts.gate_up_proj.data, experts.down_proj.data
        if getattr(experts, "is_transposed", False):  # stored as [E, D, 2F] and [E, F, D]
            gu, dp = gu.transpose(1, 2), dp.transpose(1, 2)
        if not getattr(experts, "is_concatenated", True):  # interleaved rows g0, u0, g1, u1, ...
            gu = torch.cat([gu[:, 0::2], gu[:, 1::2]], dim=1)
        return gu, dp
    if isinstance(experts, nn.ModuleList) and len(experts):  # transformers 4.x: one MLP per expert
        e0 = experts[0]
        if hasattr(e0, "w1"):  # Mixtral 4.x: w1 gate, w3 up, w2 down (nn.Linear)
            names = ("w1", "w3", "w2")
        elif hasattr(e0, "gate_proj"):
            names = ("gate_proj", "up_proj", "down_proj")
        else:
            raise TypeError(f"unknown expert MLP {type(e0).__name__}: expected w1/w3/w2 or gate_proj/up_proj/down_proj")
        g, u, d = names
        w13 = torch.stack([torch.cat([getattr(m, g).weight, getattr(m, u).weight]) for m in experts]).data
        w2 = torch.stack([getattr(m, d).weight for m in experts]).data
        return w13, w2
    raise TypeError(f"unknown experts module {type(experts).__name__}: expected gate_up_proj/down_proj tensors "
                    "or a ModuleList of expert MLPs")


def _routing_rule(block: nn.Module) -> tuple[int, bool]:
    """(top_k, renormalize) of a supported block."""
    gate = block.gate
    top_k = getattr(gate, "top_k", None) or getattr(block, "top_k", None)
    if top_k is None:
        raise TypeError(f"{type(block).__name__}: cannot find top_k on the block or its gate")
    if type(block).__name__.startswith("Mixtral"):
        return int(top_k), True  # Mixtral always renormalises the K weights
    norm = getattr(gate, "norm_topk_prob", getattr(block, "norm_topk_prob", None))
    if norm is None:
        raise TypeError(f"{type(block).__name__}: cannot find norm_topk_prob on the block or its gate")
    return int(top_k), bool(norm)


def _check_block(block) -> None:
    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be a transformers sparse-MoE nn.Module, got {type(block).__name__}")
    if not is_sparse_moe_block(block):
        raise TypeError(f"unsupported block {type(block).__name__}; supported: {sorted(SUPPORTED_BLOCKS)}")


class SharedExpertMoE(nn.Module):
    """Routed MoELayer plus a gated shared expert (Qwen2-MoE): y = moe(x) + sigmoid(x @ g^T) * shared(x).

    shared(x) = shared_down_proj @ (silu(shared_gate_proj @ x) * (shared_up_proj @ x)), with
    shared_gate_proj, shared_up_proj [Fs, D], shared_down_proj [D, Fs], shared_expert_gate [1, D].
    forward takes and returns what MoELayer does; stats describe the routed experts only.
    """

    def __init__(self, moe: MoELayer, shared_gate_proj: torch.Tensor, shared_up_proj: torch.Tensor,
                 shared_down_proj: torch.Tensor, shared_expert_gate: torch.Tensor):
        super().__init__()
        self.moe = moe
        self.cfg = moe.cfg
        for name, w in (("shared_gate_proj", shared_gate_proj), ("shared_up_proj", shared_up_proj),
                        ("shared_down_proj", shared_down_proj), ("shared_expert_gate", shared_expert_gate)):
            self.register_parameter(name, nn.Parameter(w, requires_grad=False))

    def route(self, x2d: torch.Tensor) -> Routing:
        """Routing for x2d [T, D] with the routed experts' router."""
        return self.moe.route(x2d)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Gated shared-expert output for x [..., D]."""
        h = Fn.silu(x @ self.shared_gate_proj.t()) * (x @ self.shared_up_proj.t())  # [..., Fs]
        y = h @ self.shared_down_proj.t()  # [..., D]
        return torch.sigmoid(x @ self.shared_expert_gate.t()) * y  # [..., 1] * [..., D]

    def forward(self, x: torch.Tensor, strategy: str = "grouped", routing: Routing | None = None,
                capacity: CapacityConfig | None = None) -> MoEOutput:
        """The routed MoE (any strategy, routing, capacity) plus the gated shared expert."""
        out = self.moe(x, strategy=strategy, routing=routing, capacity=capacity)
        return MoEOutput(out.output + self.shared(x), out.stats)


def from_hf(block: nn.Module, *, copy: bool = True, dtype: torch.dtype | None = None) -> MoELayer | SharedExpertMoE:
    """Convert a transformers sparse-MoE block into moe_ref, keeping its routing rule.

    Returns an MoELayer, or a SharedExpertMoE when the block has a gated shared expert (Qwen2-MoE).
    copy=False shares the block's weight storage (what patch_model does); dtype casts (implies a copy).
    """
    _check_block(block)
    top_k, renorm = _routing_rule(block)
    router_weight = block.gate.weight.data  # [E, D]
    w13, w2 = _expert_weights(block.experts)  # [E, 2F, D], [E, D, F]
    E, D = router_weight.shape
    if w13.shape[0] != E or w13.shape[2] != D or w2.shape[:2] != (E, D) or w13.shape[1] != 2 * w2.shape[2]:
        raise ValueError(f"inconsistent expert shapes: router {tuple(router_weight.shape)}, "
                         f"gate_up {tuple(w13.shape)}, down {tuple(w2.shape)}")
    cfg = MoEConfig(d_model=D, d_ff=w2.shape[2], num_experts=E, top_k=top_k, renormalize=renorm)

    def conv(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype) if dtype is not None else t
        return t.detach().clone() if copy else t.detach()

    layer = MoELayer.from_weights(cfg, conv(router_weight), conv(w13), conv(w2))
    if not SUPPORTED_BLOCKS[type(block).__name__]:
        return layer
    se = block.shared_expert
    return SharedExpertMoE(layer, conv(se.gate_proj.weight.data), conv(se.up_proj.weight.data),
                           conv(se.down_proj.weight.data), conv(block.shared_expert_gate.weight.data))


# ----------------------------------------------------------------------------------------- patching

@dataclass
class LayerStats:
    """Routing statistics of one patched block, accumulated over forward passes.

    expert_counts: [E] int64 assignments routed to each expert (before capacity), summed over calls.
    calls: forward calls; tokens: tokens seen; dropped / dropped_tokens / rerouted: summed MoEStats;
    passes: expert passes run (spill may need more than one per call); capacity: C of the last call.
    routings: the Routing of every call (only when patch_model(record_routing=True)).
    """

    name: str
    num_experts: int
    top_k: int
    expert_counts: torch.Tensor
    calls: int = 0
    tokens: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    rerouted: int = 0
    passes: int = 0
    capacity: int | None = None
    last: MoEStats | None = None
    routings: list[Routing] = field(default_factory=list, repr=False)

    @property
    def routed(self) -> int:
        """Assignments routed (tokens * K)."""
        return int(self.expert_counts.sum())

    @property
    def imbalance(self) -> float:
        """max expert load / mean expert load (1.0 = perfectly balanced; 0 when nothing was routed)."""
        n = self.routed
        return 0.0 if n == 0 else float(self.expert_counts.max()) * self.num_experts / n

    def add(self, stats: MoEStats, tokens: int, routing: Routing | None) -> None:
        """Accumulate one forward call's MoEStats (and its Routing when recording)."""
        self.calls += 1
        self.tokens += tokens
        self.expert_counts += stats.expert_counts.to(self.expert_counts.device)
        self.dropped += stats.dropped
        self.dropped_tokens += stats.dropped_tokens
        self.rerouted += stats.rerouted
        self.passes += stats.passes
        self.capacity = stats.capacity
        self.last = stats
        if routing is not None:
            self.routings.append(routing)


class HFMoEBlock(nn.Module):
    """Drop-in for a transformers sparse-MoE block, computed by moe_ref; every call adds to `stats`.

    forward(hidden_states [B, S, D]) -> [B, S, D], or the tuple (hidden_states, router_logits [B*S, E])
    when the replaced block returned one (transformers 4.x). Router, capacity and strategy are moe_ref's.
    """

    def __init__(self, moe: MoELayer | SharedExpertMoE, stats: LayerStats, strategy: str = "grouped",
                 capacity: CapacityConfig | None = None, return_router_logits: bool = False,
                 record_routing: bool = False):
        super().__init__()
        self.moe = moe
        self.stats = stats
        self.strategy = strategy
        self.capacity = capacity
        self.return_router_logits = return_router_logits
        self.record_routing = record_routing

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, capacity={self.capacity}"

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """Route, apply capacity, run the strategy, record the stats; same return type as the original block."""
        D = hidden_states.shape[-1]
        x2d = hidden_states.reshape(-1, D)  # [T, D]
        routing = self.moe.route(x2d)
        out = self.moe(x2d, strategy=self.strategy, routing=routing, capacity=self.capacity)
        self.stats.add(out.stats, x2d.shape[0], routing if self.record_routing else None)
        y = out.output.view(hidden_states.shape)
        if self.return_router_logits:
            return y, routing.logits.to(hidden_states.dtype)
        return y


@dataclass
class PatchReport:
    """What patch_model did: one LayerStats per swapped block (in module order), and how to undo it.

    Use as a context manager to unpatch on exit: `with patch_model(model) as report: model(ids)`.
    """

    layers: list[LayerStats]
    strategy: str
    capacity: CapacityConfig | None
    _swaps: list = field(default_factory=list, repr=False)  # (parent, attr, original, patched)

    @property
    def modules(self) -> list[HFMoEBlock]:
        return [s[3] for s in self._swaps]

    def reset(self) -> None:
        """Zero the statistics (e.g. after a warm-up pass)."""
        for s in self.layers:
            s.expert_counts.zero_()
            s.calls = s.tokens = s.dropped = s.dropped_tokens = s.rerouted = s.passes = 0
            s.capacity, s.last = None, None
            s.routings.clear()

    def unpatch(self) -> None:
        """Put the original blocks back (idempotent)."""
        for parent, attr, original, _ in self._swaps:
            setattr(parent, attr, original)
        self._swaps.clear()

    def __enter__(self) -> PatchReport:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def rows(self) -> list[dict]:
        """One dict per layer: the numbers summary() prints."""
        out = []
        for s in self.layers:
            out.append(dict(layer=s.name, calls=s.calls, tokens=s.tokens, routed=s.routed, dropped=s.dropped,
                            dropped_pct=100.0 * s.dropped / s.routed if s.routed else 0.0,
                            dropped_tokens=s.dropped_tokens, rerouted=s.rerouted, passes=s.passes,
                            capacity=s.capacity, imbalance=s.imbalance,
                            hottest=int(s.expert_counts.argmax()) if s.routed else -1))
        return out

    def summary(self) -> str:
        """A text table: per layer, tokens, routed assignments, drops, passes, load imbalance, hottest expert."""
        head = (f"{'layer':<28} {'calls':>5} {'tokens':>7} {'routed':>7} {'dropped':>7} {'drop%':>6} "
                f"{'tok0':>5} {'rerout':>6} {'passes':>6} {'C':>5} {'max/mean':>8} {'hot':>4}")
        lines = [f"moe_ref patch: strategy={self.strategy!r}, capacity={self.capacity}", head, "-" * len(head)]
        for r in self.rows():
            cap = "-" if r["capacity"] is None else str(r["capacity"])
            lines.append(f"{r['layer'][-28:]:<28} {r['calls']:>5} {r['tokens']:>7} {r['routed']:>7} "
                         f"{r['dropped']:>7} {r['dropped_pct']:>6.2f} {r['dropped_tokens']:>5} {r['rerouted']:>6} "
                         f"{r['passes']:>6} {cap:>5} {r['imbalance']:>8.2f} {r['hottest']:>4}")
        lines.append("tok0: tokens that lost all K assignments; max/mean: hottest expert load over the mean load")
        return "\n".join(lines)


def _returns_tuple(block: nn.Module, D: int, like: torch.Tensor) -> bool:
    """Does this block's forward return (hidden, router_logits) (transformers 4.x) or a tensor (5.x)?"""
    try:
        with torch.no_grad():
            out = block(torch.zeros(1, 1, D, dtype=like.dtype, device=like.device))
    except Exception:  # e.g. weights on the meta device: transformers 5.x blocks return a tensor
        return False
    return isinstance(out, tuple)


def patch_model(model: nn.Module, strategy: str = "grouped", capacity: CapacityConfig | None = None, *,
                record_routing: bool = False) -> PatchReport:
    """Swap every supported sparse-MoE block of `model` (in place) for an HFMoEBlock sharing its weights.

    strategy: any moe_ref strategy name; capacity: a CapacityConfig or None (dropless).
    record_routing=True keeps every call's Routing in report.layers[i].routings (for inspection/tests).
    Returns a PatchReport; report.unpatch() (or `with patch_model(...)`) restores the original blocks.
    Notes: the original router modules are not called, so transformers' output_router_logits capture
    (and the auxiliary load-balancing loss) sees no router logits while patched; parameter names change
    while patched (mlp.moe.w13 ...), so unpatch before saving a state_dict.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    get_strategy(strategy)
    check_capacity(capacity)
    targets = [(name, m) for name, m in model.named_modules() if is_sparse_moe_block(m)]
    if not targets:
        raise ValueError(f"no supported sparse-MoE block found in {type(model).__name__} "
                         f"(supported: {sorted(SUPPORTED_BLOCKS)})")
    report = PatchReport(layers=[], strategy=strategy, capacity=capacity)
    for name, block in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        moe = from_hf(block, copy=False)
        w = block.gate.weight
        stats = LayerStats(name=name, num_experts=moe.cfg.num_experts, top_k=moe.cfg.top_k,
                           expert_counts=torch.zeros(moe.cfg.num_experts, dtype=torch.long))
        patched = HFMoEBlock(moe, stats, strategy, capacity, _returns_tuple(block, w.shape[1], w), record_routing)
        setattr(parent, attr, patched)
        report.layers.append(stats)
        report._swaps.append((parent, attr, block, patched))
    return report
