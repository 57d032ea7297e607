"""Triton kernels under the CPU interpreter (TRITON_INTERPRET=1, set in conftest), on tiny shapes.

Every program instance runs sequentially in numpy, so shapes stay tiny (T <= 40, D, F <= 64).
bfloat16 is tested on GPU only (tests/test_kernels_gpu.py): tl.dot on bf16 is wrong in the interpreter.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_ref
import moe_ref.kernels as mk
from helpers import assert_close, examples, hand_routing, make_case
from moe_ref.kernels.configs import split_config

pytestmark = pytest.mark.skipif(not mk.interpreter_active(),
                                reason="CPU interpreter tests: need TRITON_INTERPRET=1 (set by conftest); "
                                       "the GPU path is tested in test_kernels_gpu.py")

DEV = "cpu"
DTYPES = [torch.float32, torch.float16]


# ------------------------------------------------------------------------------------- canary

@triton.jit
def _add_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(a_ptr + offs, mask=mask) + tl.load(b_ptr + offs, mask=mask), mask=mask)


def test_interpreter_canary_vector_add():
    """A broken Triton/interpreter install fails here first, with the simplest possible kernel."""
    a, b = torch.randn(100, device=DEV), torch.randn(100, device=DEV)
    out = torch.full_like(a, float("nan"))
    _add_kernel[(triton.cdiv(100, 32),)](a, b, out, 100, BLOCK=32)
    torch.testing.assert_close(out, a + b)


def test_interpreter_is_active_under_conftest():
    assert os.environ.get("TRITON_INTERPRET") != "1" or mk.interpreter_active()


# ------------------------------------------------------------------------------------ helpers

def random_ids(T, K, E, seed=0, drop=0.0):
    """[T, K] distinct experts per token; a fraction `drop` replaced by -1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.empty(0, K)
    ids = ids.long()
    if drop:
        ids[torch.rand(ids.shape, generator=g) < drop] = -1
    return ids


def check_plan_against_grouping(plan, ids, E):
    """The plan holds, expert by expert, exactly group_by_expert's slots in the same order."""
    bm, S = plan.block_m, plan.sentinel
    n = int(plan.num_padded)
    assert n % bm == 0
    sorted_ids = plan.sorted_slot_ids.cpu().long()
    experts = plan.expert_ids.cpu().long()
    assert (experts[: n // bm] >= 0).all() and (experts[n // bm:] == -1).all()
    assert (sorted_ids[n:] == S).all(), "rows past the padded end must be the sentinel"
    ref = moe_ref.group_by_expert(ids.cpu(), E)
    row_expert = experts[: n // bm].repeat_interleave(bm)  # [n]
    for e in range(E):
        rows = sorted_ids[:n][row_expert == e]
        got = rows[rows < S]
        want = ref.sorted_slots[ref.offsets[e]:ref.offsets[e + 1]]
        assert torch.equal(got, want), f"expert {e}: {got.tolist()} != {want.tolist()}"
        assert len(rows) == -(-len(want) // bm) * bm, f"expert {e}: rows not rounded up to {bm}"
    assert int((sorted_ids < S).sum()) == int((ids >= 0).sum())


# ---------------------------------------------------------------------------------- alignment

ALIGN_CASES = [  # T, K, E, block_m, drop
    (5, 2, 4, 16, 0.0), (40, 2, 8, 16, 0.3), (1, 3, 3, 16, 0.0), (33, 4, 6, 32, 0.0),
    (0, 2, 4, 16, 0.0), (40, 1, 1, 16, 0.0), (9, 4, 4, 16, 0.5), (300, 8, 128, 16, 0.1),  # many chunks
    (2000, 2, 8, 64, 0.0),  # several chunks of 1024 slots
]


ALIGN_METHODS = ["chunked", "one_program"]
# the fast tier (make check) runs one dtype / one method of the heavier families under the interpreter
FAST_DTYPES = [DTYPES[0], pytest.param(DTYPES[1], marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", [ALIGN_METHODS[0], pytest.param(ALIGN_METHODS[1], marks=pytest.mark.slow)])
@pytest.mark.parametrize("T,K,E,bm,drop", ALIGN_CASES)
def test_align_matches_torch_and_grouping(T, K, E, bm, drop, method):
    ids = random_ids(T, K, E, seed=T + E, drop=drop).to(DEV)
    plan = mk.align_block_size(ids, E, bm, method=method)
    ref = mk.align_block_size_torch(ids, E, bm)
    for f in ("sorted_slot_ids", "expert_ids", "num_padded"):
        assert torch.equal(getattr(plan, f), getattr(ref, f)), f
    assert plan.max_padded == T * K + min(T * K, E) * (bm - 1)
    check_plan_against_grouping(plan, ids, E)


@pytest.mark.parametrize("method", ALIGN_METHODS)
def test_align_all_dropped_and_one_hot_expert(method):
    ids = torch.full((6, 2), -1, dtype=torch.long, device=DEV)
    plan = mk.align_block_size(ids, 4, 16, method=method)
    assert int(plan.num_padded) == 0 and (plan.expert_ids == -1).all() and (plan.sorted_slot_ids == 12).all()
    hot = torch.stack([torch.full((37,), 2), torch.arange(37) % 2]).t().to(DEV)  # expert 2 takes every token
    plan = mk.align_block_size(hot, 4, 16, method=method)
    check_plan_against_grouping(plan, hot, 4)
    assert plan.expert_ids[:5].tolist() == [0, 0, 1, 1, 2] and int(plan.num_padded) == (2 + 2 + 3) * 16


@given(T=st.integers(0, 40), E=st.integers(1, 9), data=st.data())
@settings(max_examples=examples(8))
def test_align_random(T, E, data):
    K = data.draw(st.integers(1, E))
    bm = data.draw(st.sampled_from([16, 32]))
    ids = random_ids(T, K, E, seed=data.draw(st.integers(0, 99)), drop=data.draw(st.sampled_from([0.0, 0.4])))
    plan = mk.align_block_size(ids.to(DEV), E, bm, method=data.draw(st.sampled_from(["auto"] + ALIGN_METHODS)))
    ref = mk.align_block_size_torch(ids, E, bm)
    assert torch.equal(plan.sorted_slot_ids.cpu(), ref.sorted_slot_ids)
    assert torch.equal(plan.expert_ids.cpu(), ref.expert_ids)
    check_plan_against_grouping(plan, ids, E)


def test_align_refuses_plans_past_int32_row_ids():
    ids = torch.empty(2**28, 8, dtype=torch.long, device="meta")  # T*K = 2^31 slots, no memory behind it
    with pytest.raises(ValueError, match=r"topk_ids \(268435456, 8\).*int32 row ids"):
        mk.align_block_size(ids, 8, 16)


def test_align_single_token_layout():
    ids = torch.tensor([[3, -1, 0]], device=DEV)
    plan = mk.align_single_token(ids, 4, 16)
    assert plan.expert_ids.tolist() == [3, -1, 0] and int(plan.num_padded) == 48
    assert plan.sorted_slot_ids.view(3, 16)[:, 0].tolist() == [0, 1, 2]
    assert (plan.sorted_slot_ids.view(3, 16)[:, 1:] == 3).all()


@pytest.mark.parametrize("bad,err", [
    (dict(topk_ids=torch.zeros(3)), ValueError), (dict(topk_ids=torch.zeros(3, 2)), TypeError),
    (dict(num_experts=0), ValueError), (dict(block_m=24), ValueError), (dict(block_m=True), ValueError),
])
def test_align_bad_input(bad, err):
    args = dict(topk_ids=torch.zeros(3, 2, dtype=torch.long), num_experts=4, block_m=16) | bad
    name = next(iter(bad))
    with pytest.raises(err, match=name if name != "topk_ids" else "topk_ids"):
        mk.align_block_size(**args)


# ------------------------------------------------------------------------------------- gating

@pytest.mark.parametrize("T,E,K", [(1, 4, 2), (37, 8, 2), (20, 60, 8), (5, 3, 3), (9, 1, 1)])
@pytest.mark.parametrize("renorm", [True, False])
def test_topk_gating_matches_route(T, E, K, renorm):
    g = torch.Generator().manual_seed(T * E)
    x, w = torch.randn(T, 16, generator=g), torch.randn(E, 16, generator=g)
    r = moe_ref.route(x, w, K, renormalize=renorm)
    ids, weights = mk.topk_gating(r.logits.to(DEV), K, renormalize=renorm)
    assert torch.equal(ids.cpu(), r.topk_ids)
    torch.testing.assert_close(weights.cpu(), r.topk_weights, rtol=1e-6, atol=1e-7)
    if renorm:
        torch.testing.assert_close(weights.sum(-1).cpu(), torch.ones(T))


def test_topk_gating_ties_lower_index_and_sigmoid():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    ids, w = mk.topk_gating(logits.to(DEV), 3, renormalize=False)
    assert ids.tolist() == [[1, 2, 3], [0, 1, 2]]
    ref_ids, ref_w = mk.topk_gating_torch(logits, 3, renormalize=False)
    torch.testing.assert_close(w.cpu(), ref_w)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(11, 6, generator=g)
    ids, w = mk.topk_gating(logits.to(DEV), 2, renormalize=False, scoring="sigmoid")
    ref_ids, ref_w = mk.topk_gating_torch(logits, 2, renormalize=False, scoring="sigmoid")
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(w.cpu(), ref_w)


def test_topk_gating_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        mk.topk_gating(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="logits"):
        mk.topk_gating(torch.randn(3), 1)
    with pytest.raises(ValueError, match="scoring"):
        mk.topk_gating(torch.randn(3, 4), 1, scoring="relu")


# --------------------------------------------------------------------- each GEMM kernel alone

@pytest.mark.parametrize("dtype", DTYPES)
def test_each_kernel_matches_its_torch_reference(dtype):
    T, D, F, E, K = 21, 33, 22, 4, 2
    layer, x = make_case(T, D, F, E, K, dtype=dtype, seed=5)
    r = layer.route(x)
    ids = r.topk_ids.clone()
    ids[3, 1] = -1  # one dropped slot
    cfg = mk.get_config(T, E, K, D, F, interpreter=True)
    plan = mk.align_block_size(ids, E, cfg["BLOCK_M"])
    act = mk.gate_up(x, layer.w13, plan, cfg)
    act_ref = mk.gate_up_torch(x, layer.w13, plan)
    used = int(plan.num_padded)
    assert_close(act[:used].float(), act_ref[:used].float(), dtype=dtype, msg="gate_up")
    slot_out = mk.down(act_ref, layer.w2, r.topk_weights, plan, cfg)
    out_ref = mk.down_torch(act_ref, layer.w2, r.topk_weights, plan)
    kept = (ids >= 0).reshape(-1)
    assert_close(slot_out[kept].float(), out_ref[kept].float(), dtype=dtype, msg="down")
    y = mk.combine(out_ref, ids, dtype)
    torch.testing.assert_close(y.float(), mk.combine_torch(out_ref, ids, dtype).float(), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------ split-K second GEMM

@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("F,split", [(100, 3), pytest.param(100, 8, marks=pytest.mark.slow),
                                     pytest.param(22, 4, marks=pytest.mark.slow),
                                     pytest.param(48, 3, marks=pytest.mark.slow),
                                     pytest.param(33, 1, marks=pytest.mark.slow)])  # the fast tier keeps one
def test_split_k_down_matches_reference(F, split, dtype):
    """down() with SPLIT_K: fp32 partial sums per chunk of F (each a multiple of BLOCK_K, the last one short;
    SPLIT_K capped at the number of BLOCK_K steps), summed by combine in a fixed order."""
    T, D, E, K = 19, 33, 4, 2
    layer, x = make_case(T, D, F, E, K, dtype=dtype, seed=F + split)
    r = layer.route(x)
    ids = r.topk_ids.clone()
    ids[2, 0] = -1  # a dropped slot: no plane holds its row, combine skips it
    base = dict(mk.get_config(T, E, K, D, F, interpreter=True), BLOCK_K=16)
    cfg = dict(base, down={"SPLIT_K": split})
    plan = mk.align_block_size(ids, E, cfg["BLOCK_M"])
    act = mk.gate_up_torch(x, layer.w13, plan)
    planes = mk.down(act, layer.w2, r.topk_weights, plan, split_config(cfg)[1])
    n = min(split, -(-F // 16))  # the cap: no more chunks than BLOCK_K steps
    assert planes.shape == ((T * K, D) if n == 1 else (n, T * K, D))
    assert planes.dtype == (dtype if n == 1 else torch.float32)
    ref = mk.down_torch(act, layer.w2, r.topk_weights, plan).float()  # [S, D]
    kept = (ids >= 0).reshape(-1)
    summed = planes.float() if n == 1 else planes.sum(0)
    assert_close(summed[kept], ref[kept], dtype=dtype, msg=f"down split {split}")
    y = mk.combine(planes, ids, dtype)
    assert torch.equal(y, mk.combine(planes, ids, dtype))  # deterministic
    torch.testing.assert_close(y.float(), mk.combine_torch(planes, ids, dtype).float(), rtol=1e-3, atol=1e-3)
    full = mk.fused_moe(x, ids, r.topk_weights, layer.w13, layer.w2, config=cfg)
    r_drop = moe_ref.Routing(ids, r.topk_weights)
    assert_close(full, reference(layer, x, r_drop), dtype=dtype, msg=f"fused_moe split {split}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_align_method_in_config_gives_the_same_output(dtype):
    """ALIGN="one_program" and "chunked" build the same plan, so fused_moe's output is bitwise the same."""
    T, D, F, E, K = 29, 33, 22, 6, 3
    layer, x = make_case(T, D, F, E, K, dtype=dtype, seed=9)
    r = layer.route(x)
    base = mk.get_config(T, E, K, D, F, interpreter=True)
    ys = {m: mk.fused_moe(x, r.topk_ids, r.topk_weights, layer.w13, layer.w2, config=dict(base, ALIGN=m))
          for m in ("auto", "one_program", "chunked")}
    assert torch.equal(ys["one_program"], ys["chunked"]) and torch.equal(ys["auto"], ys["chunked"])
    assert_close(ys["chunked"], reference(layer, x, r), dtype=dtype, msg="ALIGN")
    with pytest.raises(ValueError, match="ALIGN"):
        split_config(dict(base, ALIGN="fast"))
    with pytest.raises(ValueError, match="method"):
        mk.align_block_size(r.topk_ids, E, 16, method="fast")


def test_split_k_config_is_checked():
    cfg = mk.get_config(8, 4, 2, 64, 64, interpreter=True)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="SPLIT_K"):
            split_config(dict(cfg, down={"SPLIT_K": bad}))
    assert split_config(dict(cfg, down={"SPLIT_K": 4}))[1]["SPLIT_K"] == 4
    assert "SPLIT_K" not in split_config(dict(cfg, down={"SPLIT_K": 4}))[0]  # the first GEMM has no split


# ------------------------------------------------------------------------ fused_moe vs reference

FUSED_CASES = {  # name: T, D, F, E, K
    "odd": (13, 33, 22, 4, 2),
    "T=1": (1, 33, 22, 5, 2),
    "E=1": (17, 16, 16, 1, 1),
    "K=E": (9, 32, 16, 4, 4),
    "several-blocks": (40, 64, 64, 3, 2),
}


def reference(layer, x, r):
    return moe_ref.reference_moe(x.double(), r, layer.w13.double(), layer.w2.double())


@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_moe_matches_reference(case, dtype):
    T, D, F, E, K = FUSED_CASES[case]
    layer, x = make_case(T, D, F, E, K, dtype=dtype, seed=len(case))
    r = layer.route(x)
    y = mk.fused_moe(x, r.topk_ids, r.topk_weights, layer.w13, layer.w2)
    assert y.dtype == dtype and y.shape == (T, D)
    assert_close(y, reference(layer, x, r), dtype=dtype, msg=case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_empty_and_hot_experts(dtype):
    T, D, F, E, K = 23, 33, 22, 6, 2
    layer, x = make_case(T, D, F, E, K, dtype=dtype, seed=2)
    ids = torch.stack([torch.full((T,), 4), torch.arange(T) % 2]).t()  # expert 4 hot; 2, 3, 5 empty
    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    r = hand_routing(ids, w)
    y = mk.fused_moe(x, r.topk_ids, r.topk_weights, layer.w13, layer.w2)
    assert_close(y, reference(layer, x, r), dtype=dtype)


def test_fused_moe_dropped_ids_and_T0():
    T, D, F, E, K = 11, 33, 22, 4, 2
    layer, x = make_case(T, D, F, E, K, dtype=torch.float32, seed=9)
    r = layer.route(x)
    ids = r.topk_ids.clone()
    ids[::3, 0] = -1
    ids[5] = -1  # token 5 loses both choices: zero output
    rd = moe_ref.Routing(ids, r.topk_weights)
    y = mk.fused_moe(x, ids, r.topk_weights, layer.w13, layer.w2)
    assert_close(y, reference(layer, x, rd), dtype=torch.float32)
    assert (y[5] == 0).all()
    y1 = mk.fused_moe(x[:1], ids[:1], r.topk_weights[:1], layer.w13, layer.w2)  # T=1 path with a drop
    assert_close(y1, reference(layer, x[:1], moe_ref.Routing(ids[:1], r.topk_weights[:1])), dtype=torch.float32)
    y0 = mk.fused_moe(x[:0], ids[:0], r.topk_weights[:0], layer.w13, layer.w2)
    assert y0.shape == (0, D)


@given(T=st.sampled_from([1, 2, 7, 19]), D=st.sampled_from([16, 33]), F=st.sampled_from([8, 22]),
       E=st.integers(1, 5), data=st.data())
@settings(max_examples=examples(6))
def test_fused_moe_random(T, D, F, E, data):
    K = data.draw(st.integers(1, E))
    layer, x = make_case(T, D, F, E, K, dtype=torch.float32, seed=data.draw(st.integers(0, 999)),
                         renormalize=data.draw(st.booleans()))
    r = layer.route(x)
    y = mk.fused_moe(x, r.topk_ids, r.topk_weights, layer.w13, layer.w2)
    assert_close(y, reference(layer, x, r), dtype=torch.float32)


def test_fused_moe_explicit_config_and_forward():
    T, D, F, E, K = 20, 33, 22, 4, 2
    layer, x = make_case(T, D, F, E, K, dtype=torch.float32, seed=4)
    r = layer.route(x)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1,
               down=dict(BLOCK_N=32, BLOCK_K=16))
    y = mk.fused_moe(x, r.topk_ids, r.topk_weights, layer.w13, layer.w2, config=cfg)
    assert_close(y, reference(layer, x, r), dtype=torch.float32)
    y2 = mk.triton_moe_forward(x, layer.router_weight, layer.w13, layer.w2, K)
    assert_close(y2, reference(layer, x, r), dtype=torch.float32)


def test_fused_moe_bad_input():
    layer, x = make_case(4, 16, 8, 4, 2, dtype=torch.float32)
    r = layer.route(x)
    with pytest.raises(TypeError, match="float64"):
        mk.fused_moe(x.double(), r.topk_ids, r.topk_weights, layer.w13.double(), layer.w2.double())
    with pytest.raises(ValueError, match="topk_ids"):
        mk.fused_moe(x, r.topk_ids[:2], r.topk_weights, layer.w13, layer.w2)
    with pytest.raises(ValueError, match="w13"):
        mk.fused_moe(x, r.topk_ids, r.topk_weights, layer.w13[:, :3], layer.w2)
    with pytest.raises(ValueError, match="BLOCK_M"):
        mk.fused_moe(x, r.topk_ids, r.topk_weights, layer.w13, layer.w2,
                     config=dict(BLOCK_M=8, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1))


# ----------------------------------------------------------------------------------- configs

def test_configs_by_token_count_and_tuned_table():
    from moe_ref.kernels.backend import SM90_LIMITS
    from moe_ref.kernels.configs import smem_bytes, split_config
    small = mk.get_config(1, 8, 2, 4096, 14336)
    big = mk.get_config(16384, 8, 2, 4096, 14336)
    assert (small["BLOCK_M"], small["BLOCK_N"]) == (16, 64)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["BLOCK_K"], big["num_warps"]) == (128, 128, 64, 8)
    table = {1: dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3),
             1024: dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)}
    mk.register_tuned_configs("Test GPU", 8, 4096, 14336, "bfloat16", table)
    try:
        assert mk.get_config(2, 8, 2, 4096, 14336, "bfloat16", "Test GPU")["BLOCK_N"] == 32
        assert mk.get_config(3, 8, 2, 4096, 14336, "bfloat16", "Test GPU")["BLOCK_N"] == 64  # 3x from 1: default
        assert mk.get_config(900, 8, 2, 4096, 14336, "bfloat16", "Test GPU")["BLOCK_M"] == 128
        untuned = mk.get_config(900, 8, 2, 4096, 14336, "float16", "Test GPU")  # no table for fp16
        assert split_config(untuned) == split_config(mk.default_config(900, 8, 2, 4096, 14336))
    finally:
        from moe_ref.kernels.configs import TUNED_CONFIGS
        TUNED_CONFIGS.pop("Test GPU")
    budget = SM90_LIMITS.smem_per_block
    for T in (1, 64, 300, 2000, 16384):
        for dtype_name, size in (("bfloat16", 2), ("float32", 4)):
            first, second = split_config(mk.get_config(T, 8, 2, 4096, 14336, dtype_name))
            assert smem_bytes(first, size, 2) <= budget and smem_bytes(second, size, 1) <= budget
    with pytest.raises(ValueError, match="BLOCK_K"):
        mk.register_tuned_configs("x", 8, 1, 1, "bfloat16", {1: dict(table[1], BLOCK_K=48)})


# --------------------------------------------------------------------------- strategy "triton"

@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_strategy_triton(dtype):
    layer, x = make_case(19, 33, 22, 4, 2, dtype=dtype, seed=7)
    out = layer(x.view(1, 19, 33), strategy="triton")
    r = layer.route(x)
    assert out.output.shape == (1, 19, 33)
    assert_close(out.output.view(19, 33), reference(layer, x, r), dtype=dtype)
    kept = 19 * 2
    assert out.stats.computed_rows >= kept and out.stats.computed_rows % 16 == 0
    assert out.stats.padded_slots == out.stats.computed_rows - kept


@pytest.mark.parametrize("overflow", ["drop", pytest.param("spill", marks=pytest.mark.slow)])
def test_layer_strategy_triton_with_capacity(overflow):
    layer, x = make_case(24, 16, 16, 4, 2, dtype=torch.float32, seed=1)
    cap = moe_ref.CapacityConfig(capacity_factor=0.5, overflow=overflow)
    out = layer(x, strategy="triton", capacity=cap)
    layer64, _ = make_case(24, 16, 16, 4, 2, dtype=torch.float64, seed=1)
    want = layer64(x.double(), strategy="grouped", capacity=cap,
                   routing=layer.route(x))
    assert_close(out.output, want.output, dtype=torch.float32)
    if overflow == "drop":
        assert out.stats.dropped > 0
    else:
        assert out.stats.passes > 1
        assert_close(out.output, reference(layer, x, layer.route(x)), dtype=torch.float32)


@pytest.mark.slow  # a fresh interpreter
def test_strategy_triton_clear_error_without_interpreter_or_gpu():
    """Without TRITON_INTERPRET and without CUDA, strategy 'triton' says how to enable it."""
    code = textwrap.dedent("""
        import torch, moe_ref
        layer = moe_ref.MoELayer(moe_ref.MoEConfig(d_model=8, d_ff=4, num_experts=2, top_k=1))
        try:
            layer(torch.randn(3, 8), strategy="triton")
        except RuntimeError as e:
            print("ERR", e)
        else:
            print("NO ERROR")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(__file__))
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow  # compiles every kernel for sm_90
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs kernels as numpy; this really compiles them (to sm_90 cubins) to catch the rest."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-m", "moe_ref.kernels.compile_check", "--quick"], env=env,
                         capture_output=True, text=True, timeout=240, cwd=os.path.dirname(__file__))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "compiled 12 kernels for sm_90; no pointer offset formed in 32 bits" in res.stdout, res.stdout
    built = [ln for ln in res.stdout.splitlines() if ln.startswith("ok ")]
    assert len(built) == 12 and all("int32-offsets=0" in ln for ln in built), res.stdout  # the audit ran on each
    # specialized as a launch is (aligned pointers, strides of 1 as constants): the GEMMs' loads are
    # software-pipelined through shared memory (cp.async), as they must be to stream weights at speed
    gemms = [ln for ln in res.stdout.splitlines() if ln.startswith(("ok _gate_up_kernel", "ok _down_kernel"))]
    assert len(gemms) == 4, res.stdout
    for ln in gemms:
        copies = int(re.search(r"async-copies=(\d+)", ln).group(1))
        stages = int(re.search(r"stages=(\d+)", ln).group(1))
        assert stages < 2 or copies > 0, f"not pipelined: {ln}"


def test_fused_path_reads_no_device_value_on_the_host(monkeypatch):
    """No .item(), .tolist(), nonzero, bool()/int() of a tensor on the kernel path (CUDA-graph friendly).

    The GPU test checks the same with torch.cuda.set_sync_debug_mode("error") and a graph capture."""
    layer, x = make_case(13, 33, 22, 4, 2, dtype=torch.float32, seed=3)
    r = layer.route(x)

    def forbidden(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host read of a device value: {name}")
        return f

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    monkeypatch.setattr(torch, "nonzero", forbidden("torch.nonzero"))
    y = mk.fused_moe(x, r.topk_ids, r.topk_weights, layer.w13, layer.w2)
    y1 = mk.fused_moe(x[:1], r.topk_ids[:1], r.topk_weights[:1], layer.w13, layer.w2)  # T=1 path
    y2 = mk.triton_moe_forward(x, layer.router_weight, layer.w13, layer.w2, 2)
    monkeypatch.undo()
    want = reference(layer, x, r)
    assert_close(y, want, dtype=torch.float32)
    assert_close(y2, want, dtype=torch.float32)
    assert_close(y1, want[:1], dtype=torch.float32)


def test_old_triton_interpreter_with_new_numpy_is_refused_clearly(monkeypatch):
    """Triton <= 3.6's interpreter breaks on numpy >= 2.4 (measured: 3.6.0 + numpy 2.4.6 fail every kernel test)."""
    import numpy
    import triton

    from moe_ref.kernels import backend

    why = backend.interpreter_incompatibility("3.6.0", "2.4.6")
    assert why and "triton>=3.7" in why and "numpy<2.4" in why
    assert backend.interpreter_incompatibility("2.3.1", "2.4.0rc1")
    for ok in (("3.6.0", "2.3.5"), ("3.7.1", "2.4.6"), ("3.9.0", "2.4.0rc1"), ("4.0.0", "3.0.0")):
        assert backend.interpreter_incompatibility(*ok) is None, ok
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(RuntimeError, match="triton>=3.7 or numpy<2.4"):
        mk.fused_moe(torch.randn(2, 8), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                     torch.randn(1, 8, 8), torch.randn(1, 8, 4))


# ------------------------------------------------------------------- the launchers' host fast path

def test_host_helpers_match_triton():
    from moe_ref.kernels.backend import cdiv, next_pow2
    for a in range(0, 300):
        for b in (1, 2, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b)
        assert next_pow2(a) == triton.next_power_of_2(a), a


def test_launch_configs_equal_split_get_config():
    """fused_moe's cached choice is exactly split_config(get_config(...)), tuned table or not."""
    from moe_ref.kernels.backend import SM90_LIMITS, DeviceLimits
    from moe_ref.kernels.configs import TUNED_CONFIGS, launch_configs
    small_gpu = DeviceLimits(sm_count=46, smem_per_block=101376)  # less shared memory: other fitted tiles
    shapes = [(8, 2, 4096, 14336), (128, 8, 2048, 768), (4, 2, 33, 22)]
    table = {1: dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3,
                     down=dict(SPLIT_K=2)),
             4096: dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)}
    mk.register_tuned_configs("Fast GPU", 8, 4096, 14336, "bfloat16", table)
    try:
        for E, K, D, F in shapes:
            for T in (0, 1, 5, 64, 300, 2000, 16384):
                for dt in ("bfloat16", "float16", "float32"):
                    for dev, lim in ((None, SM90_LIMITS), ("Fast GPU", SM90_LIMITS), (None, small_gpu)):
                        for interp in (False, True):
                            want = split_config(mk.get_config(T, E, K, D, F, dt, dev, interp, lim))
                            got = launch_configs(T, E, K, D, F, dt, dev, interp, lim)
                            assert got == want, (T, E, dt, dev, interp, lim)
        assert launch_configs(1, 8, 2, 4096, 14336, "bfloat16", "Fast GPU", False)[1]["SPLIT_K"] == 2
    finally:
        TUNED_CONFIGS.pop("Fast GPU")
    assert "SPLIT_K" not in launch_configs(1, 8, 2, 4096, 14336, "bfloat16", "Fast GPU", False)[1]  # gone again


def test_single_token_rows_are_shared_and_right():
    ids = torch.tensor([[3, 0, 5]])
    a = mk.align_single_token(ids, 6, 16)
    b = mk.align_single_token(torch.tensor([[1, 2, 4]]), 6, 16)
    assert a.sorted_slot_ids is b.sorted_slot_ids  # made once per (K, BLOCK_M, device)
    rows = a.sorted_slot_ids.view(3, 16)
    assert rows[:, 0].tolist() == [0, 1, 2] and (rows[:, 1:] == 3).all() and int(a.num_padded) == 48
    assert a.expert_ids.tolist() == [3, 0, 5] and b.expert_ids.tolist() == [1, 2, 4]


@pytest.mark.parametrize("split", [False, True])
def test_combine_torch_takes_an_empty_batch(split):
    ids = torch.zeros(0, 2, dtype=torch.long)  # T = 0
    slot_out = torch.zeros((3, 0, 8) if split else (0, 8))
    assert mk.combine_torch(slot_out, ids, torch.bfloat16).shape == (0, 8)
