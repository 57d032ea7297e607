"""Providers: what the benchmarks time, each a fn(x [T, D], routing) -> y [T, D] over one layer's weights.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
  loop / grouped / grouped_mm / dense / padded   moe_ref strategies (torch)
  hf_eager / hf_grouped_mm / hf_batched_mm      transformers' own experts implementations on the same weights
  triton                                        moe_ref.kernels.fused_moe
  triton_graph                                  the same kernels captured once per input in a CUDA graph, replayed
make_layer draws a layer's weights on the device (MoELayer's seeded init); make_routing draws x and routes it.
"""

from __future__ import annotations

import copy as _copy
import importlib
from typing import Callable

import torch
from torch import nn

from ..config import MoEConfig
from ..layer import MoELayer
from ..router import Routing
from ..strategy import get_strategy
from ..validate import check_instance

__all__ = ["GPU_PROVIDERS", "TRITON_PROVIDERS", "REFERENCE_PROVIDER", "make_layer", "make_routing", "make_providers",
           "graph_replayer", "output_tensor", "max_rel_err", "triton_config", "hf_experts_implementations",
           "hf_experts_providers"]

GPU_PROVIDERS = ("loop", "grouped", "grouped_mm", "hf", "triton", "triton_graph")  # "hf": one hf_<impl> each
TRITON_PROVIDERS = ("triton", "triton_graph")
REFERENCE_PROVIDER = "grouped"  # every provider's output is compared with this one's


def make_layer(shape, dtype: torch.dtype, device, seed: int = 0) -> MoELayer:
    """A MoELayer of `shape` whose weights are drawn on `device` (no pass through host memory), in `dtype`."""
    cfg = MoEConfig(shape.d_model, shape.d_ff, shape.num_experts, shape.top_k)
    return MoELayer(cfg, dtype=dtype, device=device, seed=seed)


def make_routing(layer: MoELayer, T: int, skew: float, seed: int):
    """x [T, D] (standard normal) and its Routing through the layer's router; skew > 0 biases it Zipf-like."""
    dev, dt = layer.w13.device, layer.w13.dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(T, layer.cfg.d_model, generator=g, device=dev).to(dt)  # [T, D]
    if skew > 0:
        from ..skew import skewed_routing

        r = skewed_routing(x, layer.router_weight, layer.cfg.top_k, skew, renormalize=layer.cfg.renormalize)
    else:
        r = layer.route(x)
    return x, r


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (0 for empty outputs): one number to flag a provider or config that disagrees."""
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0


def output_tensor(out) -> torch.Tensor:
    """The output tensor of a provider (tensor, StrategyResult.y or MoEOutput.output)."""
    for attr in ("y", "output"):
        if hasattr(out, attr):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def make_providers(layer: MoELayer, names, notes: list[str]) -> dict[str, Callable]:
    """{provider: fn(x, routing) -> y}; providers that cannot be built are left out with a note."""
    providers: dict[str, Callable] = {}
    w13, w2 = layer.w13, layer.w2
    for name in names:
        if name == "hf":
            try:
                for impl, fn in hf_experts_providers(layer).items():
                    providers[impl if impl.startswith("hf_") else f"hf_{impl}"] = fn
            except Exception as e:  # absent (ImportError/AttributeError) or broken on this version: note it
                notes.append(f"Hugging Face providers skipped: {type(e).__name__}: {e}")
        elif name in TRITON_PROVIDERS:
            if name == "triton_graph" and not w13.is_cuda:
                notes.append("triton_graph provider skipped: CUDA graphs need a CUDA device")
                continue
            try:
                kernels = importlib.import_module("moe_ref.kernels")
                fused = kernels.fused_moe
                eager = lambda x, r, f=fused: f(x, r.topk_ids, r.topk_weights, w13, w2)
                providers[name] = eager if name == "triton" else graph_replayer(eager)
            except Exception as e:  # no triton, or moe_ref.kernels failed to import: note it, time the rest
                notes.append(f"{name} provider skipped: {type(e).__name__}: {e}")
        else:
            fn = get_strategy(name)
            providers[name] = lambda x, r, f=fn: f(x, r, w13, w2)
    return providers


def graph_replayer(fn: Callable) -> Callable:
    """fn(x, routing) -> y, captured in a CUDA graph on the first call with given inputs and replayed after.

    A replay reads the inputs' current contents (same tensors, new values are fine) and returns the graph's
    own output tensor. One graph is kept: a call with other tensors (another T) captures anew. The capture
    is preceded by two eager calls on a side stream (compiles the kernels, settles the allocator)."""
    state: dict = {}

    def run(x: torch.Tensor, r) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape), r.topk_ids.data_ptr(), r.topk_weights.data_ptr())
        if state.get("key") != key:
            state.clear()
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(x, r)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = fn(x, r)  # [T, D] the graph's output buffer
            state.update(key=key, graph=graph, y=y, inputs=(x, r))  # inputs kept alive with the graph
        state["graph"].replay()
        return state["y"]

    return run


def triton_config(x: torch.Tensor, shape) -> dict | None:
    """The tile config fused_moe picks for x at this shape (None if moe_ref.kernels cannot say)."""
    try:
        from ..kernels.fused_moe import pick_config

        return pick_config(x, shape.num_experts, shape.top_k, shape.d_ff)
    except Exception:  # no triton: the provider was skipped anyway
        return None


# ------------------------------------------------------------------ transformers' experts implementations

def _experts_class():
    """transformers' Mixtral experts module (decorated with use_experts_implementation), or None."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        return None, None
    return MixtralConfig, MixtralExperts


def hf_experts_implementations() -> list[str]:
    """Names of transformers' experts implementations available here ("eager" first), [] without transformers."""
    cfg_cls, ex_cls = _experts_class()
    if ex_cls is None:
        return []
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ["eager"]
    return ["eager"] + [n for n in ("grouped_mm", "batched_mm") if n in ALL_EXPERTS_FUNCTIONS]


def hf_experts_providers(layer: MoELayer) -> dict[str, callable]:
    """transformers' own experts implementations on `layer`'s weights: {name: fn(x2d [T, D], routing) -> y [T, D]}.

    Names among "eager", "grouped_mm", "batched_mm", as this transformers has them ({} without transformers;
    an implementation this version cannot build is left out).
    The weights are shared with the layer (no copy). Routing ids must be >= 0 (dropless routings only).
    """
    check_instance("layer", layer, MoELayer)
    cfg_cls, ex_cls = _experts_class()
    if ex_cls is None:
        return {}
    c = layer.cfg
    base = cfg_cls(hidden_size=c.d_model, intermediate_size=c.d_ff, num_local_experts=c.num_experts,
                   num_experts_per_tok=c.top_k, hidden_act="silu")
    out = {}
    for name in hf_experts_implementations():
        try:
            hcfg = _copy.deepcopy(base)
            hcfg._experts_implementation = name
            with torch.device("meta"):
                ex = ex_cls(hcfg)
            ex.gate_up_proj = nn.Parameter(layer.w13.data, requires_grad=False)  # [E, 2F, D], shared
            ex.down_proj = nn.Parameter(layer.w2.data, requires_grad=False)  # [E, D, F], shared
        except (AttributeError, KeyError, ValueError, TypeError):  # this transformers lacks the implementation
            continue
        out[name] = _provider(ex, c.num_experts)
    return out


def _provider(ex: nn.Module, E: int):
    checked = None  # the last topk_ids tensor found dropless: a benchmark's repeated calls skip the check,
    # which reads a device value on the host (a sync that would be timed against transformers, not us)

    def run(x2d: torch.Tensor, routing: Routing) -> torch.Tensor:
        nonlocal checked
        ids = routing.topk_ids
        if ids is not checked:
            if ids.numel() and int(ids.min()) < 0:
                raise ValueError("transformers experts take dropless routings only (routing has ids -1)")
            checked = ids
        with torch.no_grad():
            return ex(x2d, ids, routing.topk_weights)

    return run

