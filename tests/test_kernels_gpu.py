"""Triton kernels on a CUDA GPU: real shapes, bf16/fp16/fp32, CUDA graphs, int64 indexing.

Run with the interpreter off:  TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_gpu.py
(conftest sets TRITON_INTERPRET=1 unless the environment already says otherwise; compiled
kernels are what these tests are about, so they skip under the interpreter.)
References are computed with the "grouped" strategy in float32 from the same rounded inputs
(reference_moe is per token and too slow at these sizes). Errors are measured as
||y - ref|| / ||ref|| over the whole output plus a max-abs bound, per dtype.
Shapes from moe_ref.bench.SHAPES; total run time on one H200 is meant to stay under ~2 minutes.
"""

import warnings

import pytest
import torch

import moe_ref
from moe_ref.bench import SHAPES
from moe_ref.grouped import grouped_moe

mk = pytest.importorskip("moe_ref.kernels")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(mk.interpreter_active(), reason="compiled kernels: run with TRITON_INTERPRET=0"),
]

# relative Frobenius error bound and max-abs bound (outputs are O(1)) by compute dtype
REL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-5}
ABS = {torch.bfloat16: 1e-1, torch.float16: 2e-2, torch.float32: 1e-4}


def make_weights(D, F, E, dtype, seed=0):
    """Router [E, D], w13 [E, 2F, D], w2 [E, D, F] on the GPU, scaled so outputs are O(1)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rw = torch.randn(E, D, device="cuda", generator=g) / D**0.5
    w13 = (torch.randn(E, 2 * F, D, device="cuda", generator=g) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, F, device="cuda", generator=g) / F**0.5).to(dtype)
    return rw.to(dtype), w13, w2


def make_x(T, D, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(T, D, device="cuda", generator=g).to(dtype)


def reference(x, routing, w13, w2):
    """float32 "grouped" strategy on the same (already rounded) inputs."""
    return grouped_moe(x.float(), routing, w13.float(), w2.float()).y


def assert_near(y, ref, dtype, msg=""):
    assert torch.isfinite(y).all(), f"{msg}: non-finite output"
    diff = (y.float() - ref.float())
    rel = (diff.norm() / ref.float().norm().clamp_min(1e-30)).item()
    mx = diff.abs().max().item() if diff.numel() else 0.0
    assert rel < REL[dtype] and mx < ABS[dtype], f"{msg}: relative error {rel:.2e}, max abs error {mx:.2e}"


CASES = [  # shape, T, dtype
    ("mixtral", 1, torch.bfloat16),
    ("mixtral", 64, torch.bfloat16),
    ("mixtral", 16384, torch.bfloat16),
    ("qwen3", 1, torch.bfloat16),
    ("qwen3", 333, torch.bfloat16),
    ("qwen3", 4096, torch.bfloat16),
    ("qwen3", 16384, torch.bfloat16),
    ("qwen3", 200, torch.float16),
    ("qwen3", 64, torch.float32),
    ("mixtral", 37, torch.float32),
]


@pytest.mark.parametrize("shape,T,dtype", CASES, ids=[f"{s}-T{t}-{str(d)[6:]}" for s, t, d in CASES])
def test_fused_moe_real_shapes(shape, T, dtype):
    s = SHAPES[shape]
    D, F, E, K = s.d_model, s.d_ff, s.num_experts, s.top_k
    rw, w13, w2 = make_weights(D, F, E, dtype)
    x = make_x(T, D, dtype)
    r = moe_ref.route(x, rw, K, renormalize=True)
    y = mk.fused_moe(x, r.topk_ids, r.topk_weights, w13, w2)
    assert y.shape == (T, D) and y.dtype == dtype and y.device == x.device
    assert_near(y, reference(x, r, w13, w2), dtype, f"{shape} T={T} {dtype}")


@pytest.mark.parametrize("T,D,F,E,K,dtype", [
    (777, 1031, 517, 9, 3, torch.bfloat16),  # nothing a multiple of 16
    (33, 222, 511, 5, 5, torch.float16),  # K = E
    (2, 4096, 14336, 8, 2, torch.bfloat16),  # T=2 with the sorted path
])
def test_fused_moe_odd_sizes(T, D, F, E, K, dtype):
    rw, w13, w2 = make_weights(D, F, E, dtype, seed=3)
    x = make_x(T, D, dtype, seed=4)
    r = moe_ref.route(x, rw, K, renormalize=False)
    y = mk.fused_moe(x, r.topk_ids, r.topk_weights, w13, w2)
    assert_near(y, reference(x, r, w13, w2), dtype, f"T={T} D={D} F={F} E={E} K={K}")


def test_align_on_gpu_matches_torch_reference():
    for T, K, E, bm in [(16384, 8, 128, 64), (4096, 2, 8, 16), (3, 8, 256, 16), (1000, 8, 256, 128)]:
        g = torch.Generator(device="cuda").manual_seed(T)
        ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=-1).indices  # distinct per token
        ids[::7, 0] = -1  # some dropped
        plan = mk.align_block_size(ids, E, bm)
        ref = mk.align_block_size_torch(ids, E, bm)
        for f in ("sorted_slot_ids", "expert_ids", "num_padded"):
            assert torch.equal(getattr(plan, f), getattr(ref, f)), (T, K, E, bm, f)


def test_topk_gating_on_gpu_matches_route():
    g = torch.Generator(device="cuda").manual_seed(0)
    for T, E, K, renorm in [(4096, 128, 8, False), (16384, 8, 2, True), (7, 256, 8, True)]:
        logits = torch.randn(T, E, device="cuda", generator=g)
        ids, w = mk.topk_gating(logits, K, renormalize=renorm)
        ref_ids, ref_w = mk.topk_gating_torch(logits, K, renormalize=renorm)
        # softmax may differ in the last ulp: ids must agree wherever the k-th and (k+1)-th scores are apart
        p = torch.softmax(logits, -1).sort(-1, descending=True).values
        clear = (p[:, K - 1] - p[:, K]) > 1e-6  # [T]
        assert torch.equal(ids[clear].sort(-1).values, ref_ids[clear].sort(-1).values)
        assert clear.float().mean() > 0.99
        torch.testing.assert_close(w[clear], ref_w[clear], rtol=1e-5, atol=1e-6)


def test_no_host_sync_and_cuda_graph_replay():
    """The whole forward (router GEMM, gating, align, GEMMs, combine) syncs nothing and replays in a graph."""
    s = SHAPES["qwen3"]
    D, F, E, K, T = s.d_model, s.d_ff, s.num_experts, s.top_k, 256
    dtype = torch.bfloat16
    rw, w13, w2 = make_weights(D, F, E, dtype, seed=5)
    fwd = lambda x: mk.triton_moe_forward(x, rw, w13, w2, K, renormalize=False)
    static_x = make_x(T, D, dtype, seed=6)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            fwd(static_x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        fwd(static_x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fwd(static_x)
    for seed in (7, 8):
        new_x = make_x(T, D, dtype, seed=seed)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        eager = fwd(new_x)
        # same kernels, same configs, fixed-order combine: expected bitwise equal; a cuBLAS router GEMM may pick
        # another algorithm under capture, so accept a last-bit difference but never a real one
        if not torch.equal(static_y, eager):
            d = (static_y.float() - eager.float()).abs().max().item()
            assert d <= 2e-2, f"graph replay differs from the eager forward by {d:.2e} (max abs)"
        r = moe_ref.route(new_x, rw, K, renormalize=False)
        assert_near(static_y, reference(new_x, r, w13, w2), dtype, f"graph replay seed {seed}")


def test_int64_indexing_at_large_T_times_K():
    """S*D > 2^31: slot rows at the end of slot_out need 64-bit offsets (vLLM #5938-style crashes)."""
    T, K, E, D, F = 65536, 8, 16, 4160, 32
    assert T * K * D > 2**31
    dtype = torch.bfloat16
    rw, w13, w2 = make_weights(D, F, E, dtype, seed=9)
    x = make_x(T, D, dtype, seed=10)
    r = moe_ref.route(x, rw, K, renormalize=True)
    y = mk.fused_moe(x, r.topk_ids, r.topk_weights, w13, w2)
    for rows in (slice(0, 64), slice(T // 2, T // 2 + 64), slice(T - 64, T)):  # last rows: largest offsets
        sub = moe_ref.Routing(r.topk_ids[rows], r.topk_weights[rows])
        assert_near(y[rows], reference(x[rows], sub, w13, w2), dtype, f"rows {rows}")
    del y
    torch.cuda.empty_cache()


def test_layer_strategy_triton_on_gpu_with_capacity_and_T0():
    cfg = moe_ref.MoEConfig(d_model=512, d_ff=384, num_experts=16, top_k=4)
    layer = moe_ref.MoELayer(cfg, dtype=torch.bfloat16, device="cuda", seed=2)
    x = make_x(300, 512, torch.bfloat16, seed=11)
    r = layer.route(x)  # the same routing for both, so near-ties cannot pick different experts
    cap = moe_ref.CapacityConfig(capacity_factor=0.7, overflow="drop")
    out = layer(x, strategy="triton", capacity=cap, routing=r)
    layer32 = moe_ref.MoELayer(cfg, dtype=torch.float32, device="cuda")
    layer32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})  # same rounded weights
    ref = layer32(x.float(), strategy="grouped", capacity=cap, routing=r)
    assert out.stats.dropped > 0 and out.stats.dropped == ref.stats.dropped
    assert_near(out.output, ref.output, torch.bfloat16, "capacity drop")
    empty = layer(x[:0], strategy="triton")
    assert empty.output.shape == (0, 512)
    y0 = mk.fused_moe(x[:0], torch.zeros(0, 4, dtype=torch.long, device="cuda"),
                      torch.zeros(0, 4, device="cuda"), layer.w13, layer.w2)
    assert y0.shape == (0, 512)


def test_bench_graph_provider_replays_with_new_values_and_recaptures_for_new_inputs():
    """moe_ref.bench's triton_graph provider: a replay sees the inputs' new values; other tensors re-capture."""
    from moe_ref.bench.providers import graph_replayer

    D, F, E, K = 256, 384, 16, 4
    dtype = torch.bfloat16
    rw, w13, w2 = make_weights(D, F, E, dtype, seed=11)
    eager = lambda x, r: mk.fused_moe(x, r.topk_ids, r.topk_weights, w13, w2)
    replay = graph_replayer(eager)
    route = lambda x: moe_ref.route(x, rw, K)
    x = make_x(37, D, dtype, seed=12)
    r = route(x)
    assert_near(replay(x, r), reference(x, r, w13, w2), dtype, "first call (capture)")
    new_x = make_x(37, D, dtype, seed=13)
    new_r = route(new_x)
    x.copy_(new_x)  # same tensors, new values: the replay must see them
    r.topk_ids.copy_(new_r.topk_ids)
    r.topk_weights.copy_(new_r.topk_weights)
    y = replay(x, r)
    torch.cuda.synchronize()
    assert_near(y, reference(new_x, new_r, w13, w2), dtype, "replay with new values")
    x2 = make_x(5, D, dtype, seed=14)  # other tensors (another T): a new capture
    r2 = route(x2)
    assert_near(replay(x2, r2), reference(x2, r2, w13, w2), dtype, "new inputs")


@pytest.mark.parametrize("T,K,E,bm", [(1, 8, 128, 16), (64, 8, 128, 16), (128, 8, 256, 32), (37, 2, 8, 64),
                                      (4096, 8, 256, 64), (2, 8, 256, 128), (333, 8, 257, 16)])
def test_align_methods_agree_on_gpu(T, K, E, bm):
    """One-program and four-kernel alignment give the torch reference's plan, compiled (barrier included)."""
    g = torch.Generator(device="cuda").manual_seed(T + E)
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T)])  # [T, K]
    ids[torch.rand(ids.shape, device="cuda", generator=g) < 0.1] = -1  # some dropped
    ref = mk.align_block_size_torch(ids, E, bm)
    for method in ("one_program", "chunked"):
        plan = mk.align_block_size(ids, E, bm, method=method)
        for f in ("sorted_slot_ids", "expert_ids", "num_padded"):
            assert torch.equal(getattr(plan, f), getattr(ref, f)), (method, f)


def _free_cuda():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("T", [1, 333, 4096])
def test_top_1_routing(T):
    """K = 1: one slot per token, slot = token."""
    D, F, E, K = 1024, 512, 8, 1
    dtype = torch.bfloat16
    rw, w13, w2 = make_weights(D, F, E, dtype, seed=20)
    x = make_x(T, D, dtype, seed=21)
    r = moe_ref.route(x, rw, K, renormalize=False)
    y = mk.fused_moe(x, r.topk_ids, r.topk_weights, w13, w2)
    assert_near(y, reference(x, r, w13, w2), dtype, f"K=1 T={T}")


@pytest.mark.parametrize("T", [1, 64, 300])
def test_257_experts(T):
    """E = 257, past a power of two: BLOCK_E = 512 in the alignment, one-program (T=64) and chunked (T=300)."""
    D, F, E, K = 512, 256, 257, 8
    dtype = torch.bfloat16
    rw, w13, w2 = make_weights(D, F, E, dtype, seed=22)
    x = make_x(T, D, dtype, seed=23)
    r = moe_ref.route(x, rw, K, renormalize=True)
    y, plan = mk.fused_moe(x, r.topk_ids, r.topk_weights, w13, w2, return_plan=True)
    assert_near(y, reference(x, r, w13, w2), dtype, f"E=257 T={T}")
    if T > 1:
        ref = mk.align_block_size_torch(r.topk_ids, E, plan.block_m)
        for f in ("sorted_slot_ids", "expert_ids", "num_padded"):
            assert torch.equal(getattr(plan, f), getattr(ref, f)), f


def test_deepseek_v3_sized_expert_tensors_past_2_31_elements():
    """E=256, D=7168, F=2048: w13 holds 7.5e9 elements (15 GB bf16), so the last experts' weights start past
    2^31 elements; tokens routed to them (and to the first ones) must match the grouped strategy."""
    s = SHAPES["deepseek"]
    D, F, E, K = s.d_model, s.d_ff, s.num_experts, s.top_k
    assert (E - 1) * 2 * F * D > 2**31 and (E - 1) * D * F > 2**31
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(24)
    w13 = torch.randn(E, 2 * F, D, device="cuda", dtype=dtype, generator=g).mul_(D**-0.5)  # [E, 2F, D] 15 GB
    w2 = torch.randn(E, D, F, device="cuda", dtype=dtype, generator=g).mul_(F**-0.5)  # [E, D, F] 7.5 GB
    try:
        T = 4
        x = make_x(T, D, dtype, seed=25)
        t = torch.arange(T, device="cuda")[:, None]
        ids = (E - 1 - t - 32 * torch.arange(K, device="cuda")[None, :]) % E  # [T, K] distinct: 255-t, 223-t, ...
        w = torch.softmax(torch.randn(T, K, device="cuda", generator=g), -1)  # [T, K]
        for rows in (slice(0, T), slice(0, 1)):  # the sorted path and the T=1 path
            y = mk.fused_moe(x[rows], ids[rows], w[rows], w13, w2)
            used = ids[rows].unique()  # the reference needs only these experts in fp32 (a few GB, not 90)
            sub = moe_ref.Routing(torch.searchsorted(used, ids[rows]), w[rows])
            assert_near(y, reference(x[rows], sub, w13[used], w2[used]), dtype, f"DeepSeek-V3 experts, rows {rows}")
            del used, sub
    finally:
        del w13, w2
        _free_cuda()


def test_split_k_planes_past_2_31_elements():
    """SPLIT_K = 4 partial sums [4, S, D] with S*D < 2^31 < 3*S*D: only the split-plane offsets of the second
    GEMM and the combine pass 2^31, so they must be formed in 64 bits."""
    T, K, E, D, F = 24576, 8, 16, 4096, 256
    S = T * K
    assert S * D < 2**31 < 3 * S * D
    dtype = torch.bfloat16
    rw, w13, w2 = make_weights(D, F, E, dtype, seed=26)
    x = make_x(T, D, dtype, seed=27)
    r = moe_ref.route(x, rw, K, renormalize=True)
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, down=dict(SPLIT_K=4))
    try:
        y = mk.fused_moe(x, r.topk_ids, r.topk_weights, w13, w2, config=cfg)  # slot_out: 12.9 GB of fp32
        for rows in (slice(0, 64), slice(T - 64, T)):  # the last tokens: the largest offsets in every plane
            sub = moe_ref.Routing(r.topk_ids[rows], r.topk_weights[rows])
            assert_near(y[rows], reference(x[rows], sub, w13, w2), dtype, f"split planes, rows {rows}")
    finally:
        _free_cuda()


@pytest.mark.parametrize("T", [64, 300, 4096])
def test_bf16_dot_path_of_each_gemm_matches_the_float32_reference(T):
    """Compiled tl.dot on bf16 tiles (the interpreter's upcast off) with the default config of each token-count
    bucket (T=4096: the 128x128 prefill tile on 8 warps), each GEMM alone against its float32 reference, and
    no config shrunk for lack of shared memory."""
    from moe_ref.kernels.configs import split_config
    from moe_ref.kernels.fused_moe import TileConfigShrunk, _kernel_flags

    assert _kernel_flags(torch.bfloat16) == dict(UPCAST=False, IEEE_FP32=False)
    D, F, E, K = 1024, 1024, 8, 2
    dtype = torch.bfloat16
    rw, w13, w2 = make_weights(D, F, E, dtype, seed=28)
    x = make_x(T, D, dtype, seed=29)
    r = moe_ref.route(x, rw, K, renormalize=True)
    first, second = split_config(mk.get_config(T, E, K, D, F, "bfloat16"))
    plan = mk.align_block_size(r.topk_ids, E, first["BLOCK_M"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TileConfigShrunk)  # the default must fit an H200 block as it is
        act = mk.gate_up(x, w13, plan, first)  # [P, F] bf16
        slot_out = mk.down(act, w2, r.topk_weights, plan, second)  # [S, D] bf16
    n = int(plan.num_padded)
    real = plan.sorted_slot_ids[:n] < plan.sentinel  # grouped rows holding a slot
    act_ref = mk.gate_up_torch(x.float(), w13.float(), plan)  # [P, F] fp32
    assert_near(act[:n][real], act_ref[:n][real], dtype, f"gate_up T={T} {first}")
    out_ref = mk.down_torch(act.float(), w2.float(), r.topk_weights, plan)  # [S, D] fp32, from the same act
    assert_near(slot_out, out_ref, dtype, f"down T={T} {second}")
