"""Compile every kernel for a GPU target without a GPU: catches what the interpreter cannot.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
The interpreter runs kernels as numpy, so type errors, unsupported ops or layouts only show when
Triton really compiles. triton.compile() with a GPUTarget goes all the way to a cubin (Triton ships
its own ptxas) on a machine with no GPU and never touches the driver.
Usage:  python -m moe_ref.kernels.compile_check [--arch 90] [--quick]
It must run with TRITON_INTERPRET unset (or 0): under the interpreter the kernels are not JIT functions.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

GEMM_INDEX_PTRS = {"sorted_slot_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32",
                   "topk_weights_ptr": "*fp32"}


def _build(kernel, sig: dict, consts: dict, target, num_warps: int = 4, num_stages: int = 3):
    import triton
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: ("constexpr" if n in consts else sig[n]) for n in names}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def _gemm_sig(kernel, dt: str) -> dict:
    return {n: (GEMM_INDEX_PTRS.get(n, "*" + dt) if n.endswith("_ptr") else "i32") for n in kernel.arg_names}


def compile_all(arch: int = 90, quick: bool = False, log=print) -> list[str]:
    """Compile each kernel (GEMMs for the default configs of several token counts); return the names built."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset or 0 (the interpreter does not compile)")
    from triton.backends.compiler import GPUTarget

    align = importlib.import_module("moe_ref.kernels.align")
    fm = importlib.import_module("moe_ref.kernels.fused_moe")
    tg = importlib.import_module("moe_ref.kernels.topk_gating")
    from .configs import get_config, split_config

    target = GPUTarget("cuda", arch, 32)
    built = []

    def build(kernel, sig, consts, num_warps=4, num_stages=3):
        t0 = time.perf_counter()
        k = _build(kernel, sig, consts, target, num_warps, num_stages)
        built.append(kernel.fn.__name__)
        log(f"ok {kernel.fn.__name__:22s} {consts} warps={num_warps} stages={num_stages} "
            f"shared={k.metadata.shared} B ({time.perf_counter() - t0:.1f} s)")

    dtypes = ["bf16"] if quick else ["bf16", "fp16", "fp32"]
    tokens = [1, 16384] if quick else [1, 300, 2000, 16384]
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    for dt in dtypes:
        for T in tokens:  # Mixtral shape: one config per token-count bucket
            first, second = split_config(get_config(T, 8, 2, 4096, 14336, names[dt]))
            for kernel, cfg in ((fm._gate_up_kernel, first), (fm._down_kernel, second)):
                consts = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                              GROUP_M=cfg["GROUP_M"], UPCAST=False, IEEE_FP32=dt == "fp32")
                build(kernel, _gemm_sig(kernel, dt), consts, cfg["num_warps"], cfg["num_stages"])
        build(fm._combine_kernel, {"slot_out_ptr": "*" + dt, "topk_ids_ptr": "*i64", "y_ptr": "*" + dt,
                                   "D": "i32", "stride_os": "i32", "stride_yt": "i32"}, dict(TOP_K=8, BLOCK_D=1024))
    for sigmoid in ((False,) if quick else (False, True)):
        build(tg._topk_gating_kernel, {"logits_ptr": "*fp32", "ids_ptr": "*i64", "weights_ptr": "*fp32",
                                       "num_tokens": "i32", "num_experts": "i32", "stride_lt": "i32"},
              dict(TOP_K=8, BLOCK_T=16, BLOCK_E=256, BLOCK_K=8, SIGMOID=sigmoid, RENORMALIZE=True))
    build(align._count_kernel, {"topk_ids_ptr": "*i64", "rank_ptr": "*i32", "chunk_counts_ptr": "*i32",
                                "num_slots": "i32", "num_chunks": "i32", "num_experts": "i32"},
          dict(BLOCK_S=32, BLOCK_E=256), num_warps=8)
    build(align._scan_kernel, {"chunk_counts_ptr": "*i32", "chunk_offsets_ptr": "*i32", "counts_ptr": "*i32",
                               "num_chunks": "i32"}, dict(BLOCK_C=1024))
    build(align._offsets_kernel, {"counts_ptr": "*i32", "expert_start_ptr": "*i32", "expert_ids_ptr": "*i32",
                                  "num_padded_ptr": "*i32", "num_experts": "i32", "num_blocks": "i32"},
          dict(BLOCK_M=16, BLOCK_E=256, BLOCK_B=64))
    build(align._scatter_kernel, {"topk_ids_ptr": "*i64", "rank_ptr": "*i32", "chunk_offsets_ptr": "*i32",
                                  "expert_start_ptr": "*i32", "sorted_slot_ids_ptr": "*i32", "num_slots": "i32",
                                  "num_chunks": "i32"}, dict(BLOCK_S=32))
    return built


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = Hopper)")
    p.add_argument("--quick", action="store_true", help="bf16 and two token counts only")
    args = p.parse_args(argv)
    built = compile_all(args.arch, args.quick)
    print(f"compiled {len(built)} kernels for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
