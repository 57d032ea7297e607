"""moe_ref.hf against transformers' own MoE blocks: tiny models from configs, random weights, no downloads.

Legend: B batch, S sequence, T = B*S tokens, D d_model, E experts, K top-k.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_ref
from helpers import assert_close, examples

if os.environ.get("CI", "").lower() in ("1", "true"):
    import transformers  # noqa: F401  (CI installs the hf extra: a missing transformers is a failure)
else:
    pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[hf]')")

from transformers import (  # noqa: E402
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

from moe_ref import hf  # noqa: E402
from moe_ref.bench import providers as hf_providers  # noqa: E402  (transformers' experts, timed as peers)

D, V = 32, 100
COMMON = dict(hidden_size=D, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V, num_experts_per_tok=2)
# arch -> (model class, config kwargs, expected renormalize)
ARCHS = {
    "mixtral": (MixtralForCausalLM, MixtralConfig, dict(num_local_experts=4), True),
    "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig,
                  dict(num_experts=6, moe_intermediate_size=16, shared_expert_intermediate_size=40,
                       norm_topk_prob=False), False),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig,
                  dict(num_experts=8, moe_intermediate_size=16, norm_topk_prob=True, head_dim=8), True),
    "olmoe": (OlmoeForCausalLM, OlmoeConfig, dict(num_experts=8, norm_topk_prob=False), False),
}
DROPLESS = ["grouped", "loop", "dense", "padded"]


def build(arch: str, dtype=torch.float64, impl: str = "eager", seed: int = 0):
    """A tiny model whose MoE blocks matter: router and experts re-initialised at unit-ish scale
    (HF's std=0.02 init makes the MoE output vanish against the residual, so a broken MoE would pass)."""
    model_cls, cfg_cls, kw, _ = ARCHS[arch]
    cfg = cfg_cls(**COMMON, **kw, experts_implementation=impl)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 if ".gate." in name else p.shape[-1] ** -0.5))
    return model.to(dtype)


def tokens(seed: int = 0, B: int = 2, S: int = 9):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request):
    model = build(request.param)
    with torch.no_grad():
        ref = model(tokens()).logits
    return request.param, model, ref


def _blocks(model):
    return [m for m in model.modules() if hf.is_sparse_moe_block(m)]


# ----------------------------------------------------------------------------------------- from_hf

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_from_hf_equals_block(arch, dtype):
    # float32 runs transformers' default experts implementation (grouped_mm), float64 its eager one
    model = build(arch, dtype, impl="eager" if dtype == torch.float64 else "grouped_mm")
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(5)).to(dtype)  # [B, S, D]
    blocks = _blocks(model)
    assert len(blocks) == 2
    for block in blocks:
        layer = hf.from_hf(block)
        assert layer.cfg.renormalize is ARCHS[arch][3]
        assert layer.cfg.top_k == 2 and layer.cfg.num_experts == block.gate.weight.shape[0]
        assert isinstance(layer, hf.SharedExpertMoE) == (arch == "qwen2_moe")
        with torch.no_grad():
            want = block(x)
            for strategy in DROPLESS:
                out = layer(x, strategy=strategy)
                assert out.output.shape == want.shape and out.output.dtype == dtype
                assert_close(out.output, want, msg=f"{arch} {strategy}")
                assert out.stats.routed == x.shape[0] * x.shape[1] * 2


@settings(max_examples=examples(25))
@given(E=st.integers(1, 8), k=st.integers(1, 8), T=st.sampled_from([0, 1, 2, 33, 222]),
       arch=st.sampled_from(["mixtral", "olmoe", "qwen2_moe"]), norm=st.booleans(), seed=st.integers(0, 2**16))
def test_from_hf_random_blocks(E, k, T, arch, norm, seed):
    """Blocks built straight from configs, random E, K <= E, T incl. 0: from_hf == block (float64)."""
    K = min(k, E)
    _, cfg_cls, kw, _ = ARCHS[arch]
    kw = {key: v for key, v in kw.items() if key not in ("num_experts", "num_local_experts", "norm_topk_prob")}
    kw["num_local_experts" if arch == "mixtral" else "num_experts"] = E
    if arch != "mixtral":
        kw["norm_topk_prob"] = norm
    cfg = cfg_cls(**dict(COMMON, num_experts_per_tok=K), **kw, experts_implementation="eager")
    block_cls = {"mixtral": MixtralSparseMoeBlock, "olmoe": OlmoeSparseMoeBlock, "qwen2_moe": Qwen2MoeSparseMoeBlock}
    torch.manual_seed(seed)
    block = block_cls[arch](cfg).to(torch.float64).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * p.shape[-1] ** -0.5)
    x = torch.randn(1, T, D, generator=g, dtype=torch.float64)  # [B=1, S=T, D]
    layer = hf.from_hf(block)
    assert (layer.cfg.num_experts, layer.cfg.top_k) == (E, K)
    assert layer.cfg.renormalize is (True if arch == "mixtral" else norm)
    with torch.no_grad():
        want = block(x)
        got = layer(x, strategy="grouped")
    assert got.output.shape == want.shape
    assert_close(got.output, want)
    assert got.stats.routed == T * K


def test_from_hf_follows_norm_topk_prob():
    model = build("qwen3_moe")
    block = _blocks(model)[0]
    x = torch.randn(11, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).view(1, 11, D)
    for norm in (False, True):
        block.gate.norm_topk_prob = norm
        layer = hf.from_hf(block)
        assert layer.cfg.renormalize is norm
        with torch.no_grad():
            assert_close(layer(x).output, block(x))
    r = layer.route(x.view(-1, D))
    torch.testing.assert_close(r.topk_weights.sum(-1), torch.ones(11))


def test_from_hf_copy_and_share():
    block = _blocks(build("mixtral"))[0]
    shared = hf.from_hf(block, copy=False)
    copied = hf.from_hf(block)
    assert shared.w13.data_ptr() == block.experts.gate_up_proj.data_ptr()
    assert shared.router_weight.data_ptr() == block.gate.weight.data_ptr()
    assert copied.w13.data_ptr() != block.experts.gate_up_proj.data_ptr()
    torch.testing.assert_close(copied.w13, block.experts.gate_up_proj.detach())
    torch.testing.assert_close(copied.w2, block.experts.down_proj.detach())
    assert hf.from_hf(block, dtype=torch.float32).w13.dtype == torch.float32
    qblock = _blocks(build("qwen2_moe"))[0]
    q = hf.from_hf(qblock, copy=False)  # what patch_model does: no second copy of any weight
    assert q.shared_gate_proj.data_ptr() == qblock.shared_expert.gate_proj.weight.data_ptr()
    assert q.shared_up_proj.data_ptr() == qblock.shared_expert.up_proj.weight.data_ptr()
    assert q.shared_down_proj.data_ptr() == qblock.shared_expert.down_proj.weight.data_ptr()
    assert q.shared_expert_gate.data_ptr() == qblock.shared_expert_gate.weight.data_ptr()
    assert q.moe.w2.data_ptr() == qblock.experts.down_proj.data_ptr()


def test_from_hf_errors():
    with pytest.raises(TypeError, match="block"):
        hf.from_hf(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="block"):
        hf.from_hf("not a module")


@pytest.mark.slow  # a fresh interpreter
def test_import_moe_ref_does_not_import_transformers():
    code = ("import sys, moe_ref; assert 'transformers' not in sys.modules, 'transformers imported'; "
            "assert callable(moe_ref.hf.patch_model)")  # the lazy attribute works
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------- patch_model

@pytest.mark.parametrize("strategy", DROPLESS)
def test_patched_logits_equal_original(arch_model, strategy):
    arch, model, ref = arch_model
    ids = tokens()
    originals = [type(b) for b in _blocks(model)]
    with hf.patch_model(model, strategy, record_routing=True) as report, torch.no_grad():
        assert not _blocks(model) and len(report.modules) == 2
        out = model(ids).logits
        assert_close(out, ref, msg=f"{arch} {strategy}")
        for layer in report.layers:
            assert layer.calls == 1 and layer.tokens == ids.numel()
            assert layer.routed == ids.numel() * layer.top_k
            assert layer.dropped == 0 and layer.capacity is None
            (r,) = layer.routings
            torch.testing.assert_close(layer.expert_counts, moe_ref.expert_counts(r.topk_ids, layer.num_experts))
    assert [type(b) for b in _blocks(model)] == originals  # unpatched on exit
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_patched_block_interface(arch_model):
    arch, model, _ = arch_model
    block = _blocks(model)[0]
    x = torch.randn(2, 3, D, dtype=torch.float64)
    with torch.no_grad():
        want = block(x)
        report = hf.patch_model(model)
        try:
            got = report.modules[0](x)
        finally:
            report.unpatch()
    assert type(got) is type(want) and got.shape == want.shape
    assert_close(got, want)


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_patched_capacity_drops_match(arch_model, policy):
    arch, model, ref = arch_model
    cap = moe_ref.CapacityConfig(capacity_factor=0.5, drop_policy=policy, overflow="drop")
    with hf.patch_model(model, "grouped", cap, record_routing=True) as report, torch.no_grad():
        out = model(tokens()).logits
        out2 = model(tokens(seed=1, S=5)).logits
    assert out2.shape[1] == 5
    total = 0
    for layer in report.layers:
        assert layer.calls == 2 and len(layer.routings) == 2
        want = [moe_ref.apply_capacity(r, layer.num_experts, cap) for r in layer.routings]
        assert layer.dropped == sum(w.dropped for w in want)
        assert layer.dropped_tokens == sum(w.dropped_tokens for w in want)
        assert layer.capacity == want[-1].capacity
        assert layer.last.dropped == want[-1].dropped
        # E experts keep at most E*C assignments per call: the rest must have gone
        lower = sum(r.topk_ids.numel() - layer.num_experts * w.capacity for r, w in zip(layer.routings, want))
        assert layer.dropped >= lower > 0
        total += layer.dropped
        assert f"{layer.dropped:>7}" in report.summary()
    assert total > 0
    assert not torch.allclose(out, ref)  # dropping changes the model's output: the patch is live


def test_patched_spill_and_reroute(arch_model):
    arch, model, ref = arch_model
    spill = moe_ref.CapacityConfig(capacity_factor=0.5, overflow="spill")
    with hf.patch_model(model, "padded", spill) as report, torch.no_grad():
        assert_close(model(tokens()).logits, ref, msg=f"{arch} spill")
    assert all(layer.passes > layer.calls and layer.dropped == 0 for layer in report.layers)
    reroute = moe_ref.CapacityConfig(capacity_factor=1.0, overflow="reroute")
    with hf.patch_model(model, "grouped", reroute, record_routing=True) as report, torch.no_grad():
        model(tokens())
    for layer in report.layers:
        want = moe_ref.apply_capacity(layer.routings[0], layer.num_experts, reroute)
        assert (layer.rerouted, layer.dropped) == (want.rerouted, want.dropped)


def test_report_reset_rows_summary():
    model = build("olmoe")
    report = hf.patch_model(model)
    try:
        with torch.no_grad():
            model(tokens())
        rows = report.rows()
        assert [r["layer"] for r in rows] == ["model.layers.0.mlp", "model.layers.1.mlp"]
        assert all(r["routed"] == tokens().numel() * 2 and r["imbalance"] >= 1.0 for r in rows)
        text = report.summary()
        assert "model.layers.1.mlp" in text and "strategy='grouped'" in text
        report.reset()
        assert all(s.calls == 0 and s.routed == 0 for s in report.layers)
    finally:
        report.unpatch()
    report.unpatch()  # idempotent
    assert len(_blocks(model)) == 2


def test_patch_model_errors():
    model = build("mixtral")
    with pytest.raises(ValueError, match="strategy"):
        hf.patch_model(model, "nope")
    with pytest.raises(TypeError, match="capacity"):
        hf.patch_model(model, capacity=1.25)
    with pytest.raises(ValueError, match="no supported sparse-MoE block"):
        hf.patch_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="model"):
        hf.patch_model("model")
    assert len(_blocks(model)) == 2  # nothing half-patched


def test_patched_bfloat16_runs():
    """Low precision: patched and original agree to bf16 tolerance (HF rounds Qwen gate weights to bf16)."""
    model = build("qwen2_moe", torch.bfloat16, impl="eager")
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
        with hf.patch_model(model, "grouped"):
            out = model(ids).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.1, atol=0.1)


# ----------------------------------------------------------------------------------------- HF experts

@pytest.mark.parametrize("T,E,K", [(1, 4, 2), (33, 8, 2), (222, 6, 6), (17, 1, 1), (0, 4, 2)])
def test_hf_experts_providers_match_reference(T, E, K):
    cfg = moe_ref.MoEConfig(d_model=24, d_ff=40, num_experts=E, top_k=K)
    layer = moe_ref.MoELayer(cfg, dtype=torch.float32, seed=T)
    x = torch.randn(T, 24, generator=torch.Generator().manual_seed(T))
    r = layer.route(x)
    providers = hf_providers.hf_experts_providers(layer)
    assert "eager" in providers and set(providers) <= {"eager", "grouped_mm", "batched_mm"}
    assert list(providers) == hf_providers.hf_experts_implementations()
    want = moe_ref.reference_moe(x.double(), r, layer.w13.double(), layer.w2.double())
    for name, fn in providers.items():
        y = fn(x, r)
        assert y.shape == (T, 24) and y.dtype == torch.float32, name
        assert_close(y, want, torch.float32, msg=name)


def test_hf_experts_providers_share_weights_and_check_input():
    layer = moe_ref.MoELayer(moe_ref.MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2), seed=1)
    providers = hf_providers.hf_experts_providers(layer)
    x = torch.randn(5, 16)
    r = layer.route(x)
    before = providers["eager"](x, r)
    with torch.no_grad():
        layer.w2.mul_(2.0)
    assert_close(providers["eager"](x, r), 2 * before, torch.float32)  # same storage, no copy
    dropped = moe_ref.Routing(topk_ids=r.topk_ids.masked_fill(torch.arange(5)[:, None] == 0, -1),
                              topk_weights=r.topk_weights)
    with pytest.raises(ValueError, match="dropless"):
        providers["eager"](x, dropped)
    with pytest.raises(ValueError, match="dropless"):  # checked again: an error is not remembered as a pass
        providers["eager"](x, dropped)
    assert_close(providers["eager"](x, r), 2 * before, torch.float32)  # a checked routing is reused unchecked
    with pytest.raises(TypeError, match="layer"):
        hf_providers.hf_experts_providers(torch.nn.Linear(2, 2))
