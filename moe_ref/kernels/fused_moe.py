"""Fused MoE expert GEMMs: gather + GEMM + SwiGLU, then GEMM + gate weight, then a sum over K.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, S = T*K slots (slot s = t*K + k),
P = max_padded grouped rows (see align.py), BLOCK_M/N/K tile sizes.
  1. _gate_up_kernel: one program per (M-block, N-tile). The M-block's rows are slots of one
     expert (expert_ids); its A tile is gathered straight from x (row = slot // K), so no permuted
     copy of x exists. Two accumulators take the gate and up halves of w13[e] [2F, D]; the
     epilogue applies SwiGLU and writes act [P, F] in grouped order.
  2. _down_kernel: act x w2[e]^T, times the slot's gate weight in the epilogue, written to the
     slot's own row of slot_out [S, D] (every slot has one row: no atomics, no races).
     With SPLIT_K > 1 the reduction over F is cut into SPLIT_K chunks, each program writes its
     partial sum to its own plane of slot_out [SPLIT_K, S, D] (fp32): more programs when few
     experts are hit (decode), still no atomics.
  3. _combine_kernel: y[t] = sum over k (and over the split planes) of slot_out[., t*K + k] in fp32,
     in a fixed order (deterministic); dropped slots (id -1) are skipped.
fp32 accumulation throughout. Every offset that reaches a pointer is computed in int64: the
strides are widened to int64 on entry and program ids before they are scaled, since S*D,
SPLIT_K*S*D and E*2F*D pass 2^31 at real sizes (compile_check audits the compiled code for a
32-bit multiply feeding an address). Nothing reads a device value on the host, so the whole
forward can be captured in a CUDA graph.
Over ~350 lines on purpose: the three kernels share one buffer layout (act, slot_out, the split planes) and
its strides, and their launchers check it once; split apart, each file would restate that layout.
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from moe_ref.reference import check_weights, swiglu

from .align import AlignedPlan, align_block_size, align_single_token
from .backend import SM90_LIMITS, cdiv, device_limits, interpreter_active, next_pow2, require_backend
from .configs import get_config, launch_configs, split_config

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _tile_ids(pid, num_m_blocks, num_n_tiles, GROUP_M: tl.constexpr):
    """(M-block, N-tile) of program pid (int64), walking GROUP_M M-blocks per column of N-tiles (L2 reuse);
    int64 results, ready to scale into offsets."""
    per_group = GROUP_M * tl.cast(num_n_tiles, tl.int64)
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, D] token rows
    w13_ptr,  # [E, 2F, D] expert weights: rows 0..F-1 gate, F..2F-1 up
    act_ptr,  # [P, F] out: silu(gate) * up for each grouped row
    sorted_slot_ids_ptr,  # [P] int32 slot of each grouped row; S = padding
    expert_ids_ptr,  # [P // BLOCK_M] int32 expert of each M-block; -1 = skip
    num_padded_ptr,  # [1] int32 grouped rows in use
    num_slots,  # S = T*K (the sentinel)
    top_k,  # K: token of a slot = slot // K
    D,  # reduction length (d_model)
    F,  # output columns (d_ff)
    num_m_blocks,  # P // BLOCK_M (the grid's M extent)
    stride_xt, stride_xd,  # x strides
    stride_we, stride_wn, stride_wd,  # w13 strides (expert, output row, reduction)
    stride_am, stride_af,  # act strides
    BLOCK_M: tl.constexpr,  # rows per tile (= alignment of the plan)
    BLOCK_N: tl.constexpr,  # columns of F per tile
    BLOCK_K: tl.constexpr,  # reduction step over D
    GROUP_M: tl.constexpr,  # M-blocks per L2 group
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter: bf16 dot is wrong there)
    IEEE_FP32: tl.constexpr,  # fp32 inputs: full-precision dot instead of TF32
):
    stride_xt, stride_xd = tl.cast(stride_xt, tl.int64), tl.cast(stride_xd, tl.int64)  # every product below
    stride_we, stride_wn, stride_wd = tl.cast(stride_we, tl.int64), tl.cast(stride_wn, tl.int64), \
        tl.cast(stride_wd, tl.int64)  # that reaches a pointer is formed in int64
    stride_am, stride_af = tl.cast(stride_am, tl.int64), tl.cast(stride_af, tl.int64)
    pid_m, pid_n = _tile_ids(tl.program_id(0).to(tl.int64), num_m_blocks, tl.cdiv(F, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the padded end: nothing to do
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if e < 0:
        return  # a block of dropped slots (T=1 path)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64 grouped rows
    slot = tl.load(sorted_slot_ids_ptr + offs_m)  # [BLOCK_M]
    row_ok = slot < num_slots  # padding rows read zeros
    tok = (slot // top_k).to(tl.int64)  # [BLOCK_M] token rows to gather
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] int64 columns of F
    n_ok = offs_n < F
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd  # [BLOCK_M, BLOCK_K] gather
    g_ptrs = w13_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wd
    u_ptrs = g_ptrs + F * stride_wn  # [BLOCK_K, BLOCK_N] the up half
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0  # [BLOCK_K]
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        if IEEE_FP32:
            acc_g = tl.dot(a, wg, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, wu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, wg, acc_g)
            acc_u = tl.dot(a, wu, acc_u)
        a_ptrs += BLOCK_K * stride_xd
        g_ptrs += BLOCK_K * stride_wd
        u_ptrs += BLOCK_K * stride_wd
    act = acc_g * tl.sigmoid(acc_g) * acc_u  # [BLOCK_M, BLOCK_N] SwiGLU epilogue, in fp32
    out = act_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_af
    tl.store(out, act.to(act_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr,  # [P, F] SwiGLU activations in grouped order
    w2_ptr,  # [E, D, F] expert down projections
    topk_weights_ptr,  # [S] fp32 gate weight of each slot
    slot_out_ptr,  # [SPLIT_K, S, D] out: weighted expert output of each slot (partial sums if SPLIT_K > 1)
    sorted_slot_ids_ptr,  # [P] int32 slot of each grouped row; S = padding
    expert_ids_ptr,  # [P // BLOCK_M] int32 expert of each M-block; -1 = skip
    num_padded_ptr,  # [1] int32 grouped rows in use
    num_slots,  # S (the sentinel)
    N,  # output columns (d_model)
    F,  # reduction length (d_ff)
    num_m_blocks,  # P // BLOCK_M
    stride_am, stride_af,  # act strides
    stride_we, stride_wn, stride_wf,  # w2 strides (expert, output row, reduction)
    stride_op, stride_os, stride_on,  # slot_out strides (split plane, slot, column)
    k_per_split,  # columns of F per split (a multiple of BLOCK_K; F when SPLIT_K = 1)
    BLOCK_M: tl.constexpr,  # rows per tile (= alignment of the plan)
    BLOCK_N: tl.constexpr,  # columns of D per tile
    BLOCK_K: tl.constexpr,  # reduction step over F
    GROUP_M: tl.constexpr,  # M-blocks per L2 group
    SPLIT_K: tl.constexpr,  # chunks of the reduction over F, one per program along grid axis 1
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter)
    IEEE_FP32: tl.constexpr,  # fp32 inputs: full-precision dot instead of TF32
):
    stride_am, stride_af = tl.cast(stride_am, tl.int64), tl.cast(stride_af, tl.int64)  # int64 products only
    stride_we, stride_wn, stride_wf = tl.cast(stride_we, tl.int64), tl.cast(stride_wn, tl.int64), \
        tl.cast(stride_wf, tl.int64)
    stride_op, stride_os, stride_on = tl.cast(stride_op, tl.int64), tl.cast(stride_os, tl.int64), \
        tl.cast(stride_on, tl.int64)
    pid_m, pid_n = _tile_ids(tl.program_id(0).to(tl.int64), num_m_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64 grouped rows
    slot = tl.load(sorted_slot_ids_ptr + offs_m)  # [BLOCK_M]
    row_ok = slot < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] int64 columns of D
    n_ok = offs_n < N
    plane = tl.program_id(1).to(tl.int64)  # this program's chunk of F: [k_start, k_start + k_len)
    k_start = plane * k_per_split
    k_len = tl.minimum(F - k_start, k_per_split).to(tl.int32)  # <= 0 past the end of F: a plane of zeros
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    a_ptrs = act_ptr + offs_m[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_af
    w_ptrs = w2_ptr + e * stride_we + offs_n[None, :] * stride_wn + (k_start + offs_k)[:, None] * stride_wf
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        k_ok = offs_k < k_len - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        if IEEE_FP32:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_af
        w_ptrs += BLOCK_K * stride_wf
    gate = tl.load(topk_weights_ptr + slot, mask=row_ok, other=0.0)  # [BLOCK_M] fp32
    acc = acc * gate[:, None]  # gate weight in the epilogue (linear: partial sums may take it too)
    out = slot_out_ptr + plane * stride_op + slot.to(tl.int64)[:, None] * stride_os + offs_n[None, :] * stride_on
    tl.store(out, acc.to(slot_out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(
    slot_out_ptr,  # [SPLIT_K, S, D] weighted expert output (partial sums) of each slot
    topk_ids_ptr,  # [S] expert of each slot; -1 = dropped (its slot_out row was never written)
    y_ptr,  # [T, D] out: sum over the K slots (and the split planes) of each token
    D,  # d_model
    stride_op,  # slot_out split-plane stride
    stride_os,  # slot_out row stride
    stride_yt,  # y row stride
    TOP_K: tl.constexpr,  # K
    SPLIT_K: tl.constexpr,  # split planes of slot_out (1: a plain [S, D])
    BLOCK_D: tl.constexpr,  # columns per program
):
    stride_op, stride_os, stride_yt = tl.cast(stride_op, tl.int64), tl.cast(stride_os, tl.int64), \
        tl.cast(stride_yt, tl.int64)  # SPLIT_K*S*D passes 2^31 long before S*D does
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D] int64
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(TOP_K):  # fixed order: deterministic
        s = t * TOP_K + k
        kept = (tl.zeros([BLOCK_D], dtype=tl.int64) + tl.load(topk_ids_ptr + s)) >= 0  # [BLOCK_D] (a vector:
        # the interpreter rejects a scalar-and-vector mask)
        for p in tl.static_range(SPLIT_K):
            v = tl.load(slot_out_ptr + p * stride_op + s * stride_os + offs_d, mask=d_ok & kept, other=0.0)
            acc += v.to(tl.float32)
    tl.store(y_ptr + t * stride_yt + offs_d, acc.to(y_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------------------- launchers

@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _kernel_flags(dtype: torch.dtype) -> dict:
    interp = interpreter_active()
    return dict(UPCAST=interp, IEEE_FP32=dtype == torch.float32 and not interp)


def _launch_opts(cfg: dict) -> dict:
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


class TileConfigShrunk(UserWarning):
    """A launch ran with fewer pipeline stages or a smaller BLOCK_K than its config asked for (shared memory)."""


def _launch(kernel, grid, args: tuple, cfg: dict, flags: dict, **consts) -> None:
    """Launch; if the GPU lacks shared memory for the config (compile-time OutOfResources, so only on a
    first call), retry with fewer pipeline stages, then a smaller BLOCK_K, and warn once."""
    opts = _launch_opts(cfg)
    while True:
        try:
            kernel[grid](*args, **opts, **flags, **consts)
            return
        except OutOfResources as exc:
            if opts["num_stages"] > 1:
                opts["num_stages"] -= 1
            elif opts["BLOCK_K"] > 16:
                opts["BLOCK_K"] //= 2
            else:
                raise
            warnings.warn(f"{kernel.fn.__name__ if hasattr(kernel, 'fn') else kernel}: {exc}; retrying with "
                          f"num_stages={opts['num_stages']}, BLOCK_K={opts['BLOCK_K']}", TileConfigShrunk, stacklevel=3)


def gate_up(x: torch.Tensor, w13: torch.Tensor, plan: AlignedPlan, cfg: dict) -> torch.Tensor:
    """act [P, F] = silu(x[tok] @ gate^T) * (x[tok] @ up^T) per grouped row (rows of skipped blocks unset)."""
    F = w13.shape[1] // 2
    D = x.shape[1]
    act = torch.empty(plan.max_padded, F, dtype=x.dtype, device=x.device)  # [P, F]
    num_m = plan.max_padded // plan.block_m
    if num_m == 0:
        return act
    grid = (num_m * cdiv(F, cfg["BLOCK_N"]),)
    args = (x, w13, act, plan.sorted_slot_ids, plan.expert_ids, plan.num_padded, plan.sentinel, plan.top_k,
            D, F, num_m, x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
            act.stride(0), act.stride(1))
    _launch(_gate_up_kernel, grid, args, cfg, _kernel_flags(x.dtype))
    return act


def down(act: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, plan: AlignedPlan,
         cfg: dict) -> torch.Tensor:
    """slot_out [S, D] = gate weight * (act @ w2[e]^T), one row per slot (rows of dropped slots unset).

    With cfg["SPLIT_K"] = n > 1: fp32 partial sums [n, S, D] over n chunks of F (combine adds them up)."""
    D, F = w2.shape[1], w2.shape[2]
    S = plan.sentinel
    split = split_k(cfg, F)
    slot_out = torch.empty(split, S, D, dtype=act.dtype if split == 1 else torch.float32,
                           device=act.device)  # [SPLIT_K, S, D]
    weights = topk_weights.reshape(-1).float().contiguous()  # [S]
    num_m = plan.max_padded // plan.block_m
    if num_m > 0:
        grid = (num_m * cdiv(D, cfg["BLOCK_N"]), split)
        args = (act, w2, weights, slot_out, plan.sorted_slot_ids, plan.expert_ids, plan.num_padded, S, D, F, num_m,
                act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
                slot_out.stride(0), slot_out.stride(1), slot_out.stride(2), k_per_split(cfg, F, split))
        _launch(_down_kernel, grid, args, cfg, _kernel_flags(act.dtype), SPLIT_K=split)
    return slot_out[0] if split == 1 else slot_out


def k_per_split(cfg: dict, F: int, split: int) -> int:
    """Columns of F per chunk of a split second GEMM: F / split rounded up to a multiple of BLOCK_K."""
    return cdiv(cdiv(F, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]


def split_k(cfg: dict, F: int) -> int:
    """The config's SPLIT_K, capped so that every chunk of F holds at least one BLOCK_K step."""
    n = int(cfg.get("SPLIT_K", 1))
    return max(1, min(n, cdiv(F, cfg["BLOCK_K"]))) if F > 0 else 1


def combine(slot_out: torch.Tensor, topk_ids: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """y [T, D] = sum over k of slot_out[t*K + k] (fp32 sum, dropped slots skipped).

    slot_out is [S, D], or [SPLIT_K, S, D] partial sums from a split down(): summed too, in a fixed order."""
    T, K = topk_ids.shape
    planes = slot_out if slot_out.dim() == 3 else slot_out.unsqueeze(0)  # [SPLIT_K, S, D]
    D = planes.shape[2]
    y = torch.empty(T, D, dtype=out_dtype, device=slot_out.device)
    if T == 0 or D == 0:
        return y.zero_()
    ids = topk_ids.reshape(-1).contiguous()  # [S]
    block_d = min(1024, next_pow2(D))
    _combine_kernel[(T, cdiv(D, block_d))](planes, ids, y, D, planes.stride(0), planes.stride(1),
                                                 y.stride(0), TOP_K=K, SPLIT_K=planes.shape[0], BLOCK_D=block_d,
                                                 num_warps=4)
    return y


def check_inputs(x, topk_ids, topk_weights, w13, w2) -> tuple[int, int, int]:
    """Shape/dtype/device checks that need no device values; returns (E, D, F)."""
    E, D, F = check_weights(x, w13, w2)
    require_backend(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels support {SUPPORTED_DTYPES}, got {x.dtype}; "
                        "use a torch strategy (e.g. 'grouped') for float64")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != x.shape[0]:
            raise ValueError(f"{name} must be [T, K] with T={x.shape[0]}, got {getattr(t, 'shape', t)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} differ")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    return E, D, F


def _config_args(x: torch.Tensor, E: int, K: int, F: int) -> tuple:
    """(T, E, K, D, F, dtype name, GPU name or None, interpreter?, DeviceLimits): what the config choice
    depends on."""
    if x.is_cuda:
        dev_name, limits = _device_name(x.device.index or 0), device_limits(x.device)
    else:
        dev_name, limits = None, SM90_LIMITS
    return x.shape[0], E, K, x.shape[1], F, str(x.dtype).removeprefix("torch."), dev_name, interpreter_active(), \
        limits


def pick_config(x: torch.Tensor, E: int, K: int, F: int) -> dict:
    """The tile config for this call (interpreter, tuned table for this GPU, or the heuristic)."""
    return get_config(*_config_args(x, E, K, F))


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, config: dict | None = None, return_plan: bool = False):
    """MoE expert output y [T, D] for x [T, D], topk_ids/topk_weights [T, K] (ids -1: dropped),
    w13 [E, 2F, D], w2 [E, D, F]. All work stays on the device: no host sync, no per-expert loop.
    With return_plan=True returns (y, AlignedPlan)."""
    E, D, F = check_inputs(x, topk_ids, topk_weights, w13, w2)
    T, K = topk_ids.shape
    if config is not None:
        first, second = split_config(config)
    else:  # the same choice as pick_config, from a cache: this runs on every call
        first, second = launch_configs(*_config_args(x, E, K, F))
    if T == 1:
        plan = align_single_token(topk_ids, E, first["BLOCK_M"])
    else:
        plan = align_block_size(topk_ids, E, first["BLOCK_M"], first.get("ALIGN", "auto"))
    act = gate_up(x, w13, plan, first)  # [P, F]
    slot_out = down(act, w2, topk_weights, plan, second)  # [S, D]
    y = combine(slot_out, topk_ids, x.dtype)  # [T, D]
    return (y, plan) if return_plan else y


# -------------------------------------------------------------------------------- torch references

def _used_rows(plan: AlignedPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grouped rows in used blocks, their slots, their experts); host-synchronising (reference only)."""
    n = int(plan.num_padded)
    rows = torch.arange(n, device=plan.sorted_slot_ids.device)
    experts = plan.expert_ids.long().repeat_interleave(plan.block_m)[:n]
    keep = experts >= 0
    return rows[keep], plan.sorted_slot_ids[:n].long()[keep], experts[keep]


def gate_up_torch(x: torch.Tensor, w13: torch.Tensor, plan: AlignedPlan) -> torch.Tensor:
    """Reference of gate_up: act [P, F] with zeros on padding rows and unused blocks."""
    F = w13.shape[1] // 2
    act = torch.zeros(plan.max_padded, F, dtype=torch.float32, device=x.device)
    rows, slots, experts = _used_rows(plan)
    real = slots < plan.sentinel
    xr = x[slots[real] // plan.top_k].float()  # [n, D]
    act[rows[real]] = swiglu(torch.einsum("nd,nfd->nf", xr, w13[experts[real]].float()))
    return act.to(x.dtype)


def down_torch(act: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, plan: AlignedPlan) -> torch.Tensor:
    """Reference of down: slot_out [S, D], zeros for dropped slots."""
    slot_out = torch.zeros(plan.sentinel, w2.shape[1], dtype=torch.float32, device=act.device)
    rows, slots, experts = _used_rows(plan)
    real = slots < plan.sentinel
    out = torch.einsum("nf,ndf->nd", act[rows[real]].float(), w2[experts[real]].float())
    slot_out[slots[real]] = out * topk_weights.reshape(-1).float()[slots[real], None]
    return slot_out.to(act.dtype)


def combine_torch(slot_out: torch.Tensor, topk_ids: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Reference of combine."""
    T, K = topk_ids.shape
    if slot_out.dim() == 3:  # [SPLIT_K, S, D] partial sums of a split down()
        slot_out = slot_out.float().sum(0)
    v = slot_out.float().view(T, K, slot_out.shape[-1])  # [T, K, D] (D named: T = 0 leaves -1 ambiguous)
    v = torch.where((topk_ids >= 0).unsqueeze(-1), v, torch.zeros((), device=v.device))  # unset rows may hold NaN
    return v.sum(1).to(out_dtype)
