"""A real continuous-batching engine around moe_ref: transformers' generate_batch with patch_model in place.

Legend: T tokens in a step (all requests' query tokens packed), q_i query tokens of request i in that step,
D d_model, E experts, K top-k, C capacity per expert, H distinct experts a call touches.

transformers 5.x serves a batch of prompts by continuous batching (`model.generate_batch`): every step packs one
decode token of each running request and chunks of new prompts into one [1, T] forward (paged KV cache), so each
MoE block sees T tokens of mixed requests. With moe_ref.hf.patch_model every block is moe_ref's, and a forward
hook on each patched block records one row per MoE layer call: step, layer, tokens, hit, expert loads [E],
max load, capacity C, dropped assignments and tokens. A forward pre-hook on the model reads the step's
cu_seq_lens_q: a request with one query token is counted as a decode (a one-token prompt chunk would be too).
Dropless (capacity=None) greedy outputs equal plain `generate`; with a CapacityConfig, C is set by each step's T,
so a decode step of a few tokens gets C = max(min_capacity, ceil(T*K*cf/E)) (1 at T = 4, K = 2, E = 8, cf = 1) and
drops whatever its tokens pile onto one expert: outputs then depend on which requests share the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import CapacityConfig, check_capacity
from ..validate import check_int

__all__ = ["ServeResult", "generate_reference", "serve"]


@dataclass
class ServeResult:
    """What serve() did.

    outputs: generated token ids per prompt (prompt order). calls: one dict per MoE layer call (step, layer, tokens,
    decode_seqs, prefill_tokens, hit, loads [E], max_load, capacity, dropped, dropped_tokens). steps: one dict per
    model forward (step, tokens, decode_seqs, prefill_tokens, hit_mean over layers, dropped over layers).
    summary: the PatchReport's text table. wall_s: seconds generate_batch took. capacity: the CapacityConfig.
    """

    outputs: list[list[int]]
    calls: list[dict]
    steps: list[dict]
    summary: str
    wall_s: float
    capacity: CapacityConfig | None = None
    params: dict = field(default_factory=dict)

    def decode_drop_share(self) -> dict:
        """Dropped assignments / routed, split by step kind: {"decode": steps with decodes only, "mixed": others}."""
        out = {}
        for kind, keep in (("decode", lambda c: c["prefill_tokens"] == 0), ("mixed", lambda c: c["prefill_tokens"])):
            cs = [c for c in self.calls if keep(c)]
            routed = sum(sum(c["loads"]) for c in cs)
            out[kind] = sum(c["dropped"] for c in cs) / routed if routed else 0.0
        return out


def _check_prompts(prompts) -> list[list[int]]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        p = p.tolist() if isinstance(p, torch.Tensor) else p
        if not isinstance(p, (list, tuple)) or not p or not all(isinstance(t, int) and t >= 0 for t in p):
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids >= 0, got {p!r:.60}")
        out.append(list(p))
    return out


def _greedy(model, max_new_tokens: int):
    from transformers import GenerationConfig

    # eos -1: every request generates exactly max_new_tokens, so outputs compare position by position
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1,
                            pad_token_id=model.config.pad_token_id)


@torch.no_grad()
def generate_reference(model, prompts, max_new_tokens: int = 16) -> list[list[int]]:
    """Plain `model.generate`, one prompt at a time, greedy: the token ids it appends to each prompt."""
    from transformers.utils import logging as hf_logging

    prompts = _check_prompts(prompts)
    check_int("max_new_tokens", max_new_tokens, 1)
    cfg = _greedy(model, max_new_tokens)
    outs, verbosity = [], hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate warns on eos -1 (deliberate here: no early stop) at every call
    try:
        for p in prompts:
            ids = torch.tensor([p], device=model.device)  # [1, n]
            outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[0, len(p):]
                        .tolist())
    finally:
        hf_logging.set_verbosity(verbosity)
    return outs


def _recorder(report, calls: list[dict], step: dict):
    """Forward hooks: the model's pre-hook reads the step's layout, each patched block's hook records its call."""
    def pre(module, args, kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        q = (cu[1:] - cu[:-1]).tolist() if isinstance(cu, torch.Tensor) else []  # [requests in the step]
        step.update(index=step["index"] + 1, decode_seqs=sum(1 for n in q if n == 1),
                    prefill_tokens=sum(n for n in q if n > 1))

    def block_hook(layer: int):
        def hook(module, args, out):
            s = module.stats.last
            loads = s.expert_counts.tolist()
            calls.append(dict(step=step["index"], layer=layer, tokens=sum(loads) // module.stats.top_k,
                              decode_seqs=step["decode_seqs"], prefill_tokens=step["prefill_tokens"],
                              hit=sum(1 for n in loads if n), loads=loads, max_load=max(loads), capacity=s.capacity,
                              dropped=s.dropped, dropped_tokens=s.dropped_tokens))
        return hook

    return pre, [block_hook(i) for i in range(len(report.modules))]


def _steps(calls: list[dict]) -> list[dict]:
    by: dict[int, list[dict]] = {}
    for c in calls:
        by.setdefault(c["step"], []).append(c)
    return [dict(step=k, tokens=cs[0]["tokens"], decode_seqs=cs[0]["decode_seqs"],
                 prefill_tokens=cs[0]["prefill_tokens"], hit_mean=sum(c["hit"] for c in cs) / len(cs),
                 dropped=sum(c["dropped"] for c in cs)) for k, cs in sorted(by.items())]


@torch.no_grad()
def serve(model, prompts, max_new_tokens: int = 16, capacity: CapacityConfig | None = None,
          strategy: str = "grouped", max_batch_tokens: int = 64, page_size: int = 16, num_blocks: int = 256,
          max_requests_per_batch: int | None = None) -> ServeResult:
    """Serve `prompts` (lists of token ids) by transformers' continuous batching with moe_ref's MoE blocks.

    model: a transformers MoE causal LM (e.g. moe_ref.tiny.load_tiny_moe()); patched for the call, restored after.
    max_new_tokens: greedy tokens per request (no early stop). capacity: None (dropless) or a CapacityConfig.
    max_batch_tokens: the token budget of a step (prompts longer than that are prefilled in chunks);
    page_size, num_blocks: the paged KV cache (num_blocks * page_size token slots per layer).
    """
    from transformers import ContinuousBatchingConfig

    from ..hf import patch_model

    prompts = _check_prompts(prompts)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_capacity(capacity)
    for name, v in (("max_batch_tokens", max_batch_tokens), ("page_size", page_size), ("num_blocks", num_blocks)):
        check_int(name, v, 1)
    if page_size < 4:
        raise ValueError(f"page_size must be >= 4 (transformers' paged cache), got {page_size}")
    need = sum(-(-(len(p) + max_new_tokens) // page_size) for p in prompts)
    if need > num_blocks:
        raise ValueError(f"num_blocks={num_blocks} pages of {page_size} tokens cannot hold all requests at once "
                         f"(they need {need}): raise num_blocks")
    cb = ContinuousBatchingConfig(max_batch_tokens=max_batch_tokens, page_size=page_size, num_blocks=num_blocks,
                                  max_requests_per_batch=max_requests_per_batch, allow_block_sharing=False)
    calls: list[dict] = []
    step = dict(index=-1, decode_seqs=0, prefill_tokens=0)
    with patch_model(model, strategy=strategy, capacity=capacity) as report:
        pre, hooks = _recorder(report, calls, step)
        handles = [model.register_forward_pre_hook(pre, with_kwargs=True)]
        handles += [m.register_forward_hook(h) for m, h in zip(report.modules, hooks)]
        try:
            t0 = time.perf_counter()
            res = model.generate_batch(prompts, generation_config=_greedy(model, max_new_tokens),
                                       continuous_batching_config=cb, progress_bar=False)
            wall = time.perf_counter() - t0
        finally:
            for h in handles:
                h.remove()
        summary = report.summary()
    outs = list(res.values())
    if len(outs) != len(prompts) or any(o.error is not None for o in outs):
        errors = [o.error for o in outs if o.error is not None]
        raise RuntimeError(f"generate_batch returned {len(outs)} of {len(prompts)} requests; errors: {errors}")
    return ServeResult(outputs=[list(o.generated_tokens) for o in outs], calls=calls, steps=_steps(calls),
                       summary=summary, wall_s=wall, capacity=capacity,
                       params=dict(max_new_tokens=max_new_tokens, strategy=strategy, max_batch_tokens=max_batch_tokens,
                                   page_size=page_size, num_blocks=num_blocks))
