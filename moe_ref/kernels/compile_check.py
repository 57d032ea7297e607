"""Compile every kernel for a GPU target without a GPU: catches what the interpreter cannot.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k; TTGIR = Triton's GPU-level IR (MLIR text).
The interpreter runs kernels as numpy, so type errors, unsupported ops or layouts only show when
Triton really compiles. triton.compile() with a GPUTarget goes all the way to a cubin (Triton ships
its own ptxas) on a machine with no GPU and never touches the driver.
Each variant built is checked twice: its shared memory against what one block may use (sm_90: the
backend's SM90_LIMITS), and its TTGIR by int32_offset_findings: no 32-bit multiply may feed an address
(an int32 product wraps past 2^31 elements, and S*D, SPLIT_K*S*D or E*2F*D get there at real sizes).
Usage:  python -m moe_ref.kernels.compile_check [--arch 90] [--quick] [--candidates]
(--candidates: also every config the tuner may try, bf16, Mixtral and Qwen3-30B-A3B shapes.)
It must run with TRITON_INTERPRET unset (or 0): under the interpreter the kernels are not JIT functions.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time

GEMM_INDEX_PTRS = {"sorted_slot_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32",
                   "topk_weights_ptr": "*fp32"}


def _specialize(sig: dict, values: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as a launch with these argument values would specialize them.

    A real launch tells the compiler which pointers are 16-byte aligned and which integers are multiples
    of 16 ("tt.divisibility"), and turns integers equal to 1 into constants. Without that a compile sees
    2-byte-aligned rows: no vector loads, no cp.async pipeline, a far smaller shared-memory footprint than
    the GPU will really need. Pointers are taken as 16-byte aligned (torch's allocations are); integers
    use `values` (the real strides and sizes), or none of the hints when a value is not given."""
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, ty) in enumerate(sig.items()):
        v = values.get(name)
        if ty.startswith("*"):
            signature[name], attrs[(i,)] = ty, [["tt.divisibility", 16]]
        elif v == 1:
            signature[name], constexprs[(i,)] = "constexpr", 1
        else:
            signature[name] = ty
            if v is not None and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _build(kernel, sig: dict, consts: dict, target, num_warps: int = 4, num_stages: int = 3,
           values: dict | None = None):
    import triton
    from triton.compiler import ASTSource

    names = kernel.arg_names
    runtime = {n: sig[n] for n in names if n not in consts}
    signature, constexprs, attrs = _specialize(runtime, values or {})
    index = {n: names.index(n) for n in runtime}
    full_sig = {n: ("constexpr" if n in consts else signature[n]) for n in names}
    src = ASTSource(fn=kernel, signature=full_sig,
                    constexprs={**{(names.index(k),): v for k, v in consts.items()},
                                **{(index[list(runtime)[i[0]]],): v for i, v in constexprs.items()}},
                    attrs={(index[list(runtime)[i[0]]],): a for i, a in attrs.items()})
    return triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def _gemm_sig(kernel, dt: str) -> dict:
    return {n: (GEMM_INDEX_PTRS.get(n, "*" + dt) if n.endswith("_ptr") else "i32") for n in kernel.arg_names}


def _gemm_values(kernel_name: str, D: int, F: int) -> dict:
    """Sizes and strides the launchers pass for contiguous x [T, D], w13 [E, 2F, D], w2 [E, D, F], act [P, F],
    slot_out [S, D]; row counts (slots, M-blocks) vary per call and are left out."""
    if kernel_name == "_gate_up_kernel":
        return dict(D=D, F=F, top_k=2, stride_xt=D, stride_xd=1, stride_we=2 * F * D, stride_wn=D, stride_wd=1,
                    stride_am=F, stride_af=1)
    return dict(N=D, F=F, stride_am=F, stride_af=1, stride_we=D * F, stride_wn=F, stride_wf=1, stride_op=17 * D,
                stride_os=D, stride_on=1, k_per_split=F)


# ------------------------------------------------------------------------------- the int32 offset audit

_DEF = re.compile(r"^\s*((?:%[\w$.-]+(?::\d+)?\s*,?\s*)+)=\s*(.*)$")  # "%a = op ..." / "%r:3 = op ..."
_VALUE = re.compile(r"%[\w$.-]+")  # an SSA value; "%r#1" (one result of several) counts as %r
_OP_NAME = re.compile(r'"?([\w.^]*)')  # arith.muli, "tt.reduce"(...), ^bb0(...)
_FOR = re.compile(r"scf\.for (%[\w$.-]+) = (%[\w$.-]+) to (%[\w$.-]+) step (%[\w$.-]+)(?: iter_args\((.*?)\))?")
_I32 = re.compile(r"(?:^|[<x\s])i32\b")  # i32, or a tensor of i32, in a type
_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_FILE_LOC = re.compile(r'"([^"]+)":(\d+):\d+')
_NO_FLOW = ("tt.load", "ttg.local_load", "arith.cmpi", "arith.cmpf")  # results carry no offset of their operands
_TERMINATORS = ("scf.yield", "scf.condition", "tt.reduce.return", "tt.scan.return")


def _strip_loc(line: str) -> tuple[str, str]:
    """(the op without its trailing loc(...), the loc's text)."""
    i = line.rfind(" loc(")
    return (line, "") if i < 0 else (line[:i], line[i + 5:].rstrip().removesuffix(")"))


def _where(loc: str, locs: dict[str, str], depth: int = 0) -> str:
    """file:line of a location (followed through named and call-site locations), or '?'."""
    m = _FILE_LOC.search(loc)
    if m:
        return f"{os.path.basename(m.group(1))}:{m.group(2)}"
    ref = re.search(r"#loc\d*", loc)
    return _where(locs.get(ref.group(0), ""), locs, depth + 1) if ref and depth < 20 else "?"


def int32_offset_findings(ttgir: str) -> list[str]:
    """Every 32-bit multiply (arith.muli / arith.shli on i32 or a tensor of i32) whose result reaches the
    offset operand of a tt.addptr, in TTGIR text; [] when there is none.

    The flow is followed through every SSA use (sign extensions, adds, splats, broadcasts, selects, reductions,
    _tile_ids-style helpers inlined), through the results of ops with regions (scf.if, tt.reduce), and through
    scf.for loop-carried values; it stops at loads and comparisons (their results carry no offset). Strict on
    purpose: a bounded product (a tile row times BLOCK_M) fails too; kernels form offsets in int64 instead."""
    locs = {m.group(1): m.group(2) for m in map(_LOC_DEF.match, ttgir.splitlines()) if m}
    flows: dict[str, set[str]] = {}  # value -> values computed from it
    sources: dict[str, str] = {}  # value defined by a 32-bit multiply -> description
    sinks: list[tuple[str, str]] = []  # (offset value of a tt.addptr, description)
    frames: list[tuple[list[str], list[str]]] = []  # open regions: (results of the op, loop-carried args)

    def flow(src: str, dst: str) -> None:
        flows.setdefault(src, set()).add(dst)

    for raw in ttgir.splitlines():
        op_text, loc = _strip_loc(raw)
        line = op_text.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("}"):
            if frames:
                frame = frames.pop()
                if line.endswith("{"):  # "} else {": the same op's next region
                    frames.append(frame)
            continue
        m = _DEF.match(line)
        results, rhs = (_VALUE.findall(m.group(1)), m.group(2)) if m else ([], line)
        name = _OP_NAME.match(rhs).group(1)
        operands = _VALUE.findall(rhs)
        carried = []
        f = _FOR.search(rhs)
        if f:  # induction variable from its bounds; iter_args from their initial values
            iv, bounds = f.group(1), f.groups()[1:4]
            for b in bounds:
                flow(b, iv)
            for pair in (f.group(5) or "").split(","):
                if "=" in pair:
                    arg, init = (x.strip() for x in pair.split("=", 1))
                    carried.append(arg)
                    flow(init, arg)
            operands = []
        if name in _TERMINATORS and frames:
            res, args = frames[-1]
            vals = _VALUE.findall(rhs)
            for i, v in enumerate(vals):
                for r in res:
                    flow(v, r)
                if i < len(args):
                    flow(v, args[i])
            continue
        if name not in _NO_FLOW:
            for v in operands:
                for r in results:
                    flow(v, r)
        where = _where(loc, locs)
        if name in ("arith.muli", "arith.shli") and _I32.search(rhs.rsplit(" : ", 1)[-1]):
            for r in results:
                sources[r] = f"`{line}` ({where})"
        if name == "tt.addptr" and len(operands) >= 2:
            sinks.append((operands[1], f"`{line.split(' : ')[0]}` ({where})"))
        if line.endswith("{") or raw.rstrip().endswith("{"):  # opens a region (a loc may sit before the "{")
            frames.append((results, carried))
    if len(sinks) != len(re.findall(r'=\s*"?tt\.addptr\b', ttgir)):  # a silent pass would be worse than none
        raise ValueError(f"read {len(sinks)} of the {ttgir.count('tt.addptr')} tt.addptr ops of this TTGIR: "
                         "has Triton's IR format changed?")
    tainted: dict[str, str] = {}  # value -> the multiply it comes from
    todo = list(sources.items())
    while todo:
        v, origin = todo.pop()
        if v in tainted:
            continue
        tainted[v] = origin
        todo.extend((w, origin) for w in flows.get(v, ()) if w not in tainted)
    found = [f"32-bit multiply {tainted[off]} reaches the pointer offset of {sink}" for off, sink in sinks
             if off in tainted]
    return list(dict.fromkeys(found))  # once each (unrolled loops repeat the same pair)


# ---------------------------------------------------------------------------------------- compile all


class Int32OffsetError(RuntimeError):
    """A compiled kernel forms a pointer offset with a 32-bit multiply (int32_offset_findings)."""


def compile_all(arch: int = 90, quick: bool = False, candidates: bool = False, log=print) -> list[str]:
    """Compile each kernel (GEMMs for the default configs of several token counts, and with candidates=True
    every config `python -m moe_ref.bench tune` may try); return the names built. Raises RuntimeError if a kernel's
    shared memory passes what an sm_90 block may use, and Int32OffsetError (after building them all) if
    any kernel forms a pointer offset with a 32-bit multiply."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset or 0 (the interpreter does not compile)")
    from triton.backends.compiler import GPUTarget

    align = importlib.import_module("moe_ref.kernels.align")
    fm = importlib.import_module("moe_ref.kernels.fused_moe")
    tg = importlib.import_module("moe_ref.kernels.topk_gating")
    from .backend import SM90_LIMITS
    from .configs import get_config, split_config

    target = GPUTarget("cuda", arch, 32)
    built, bad_offsets = [], []

    def build(kernel, sig, consts, num_warps=4, num_stages=3, values=None):
        t0 = time.perf_counter()
        k = _build(kernel, sig, consts, target, num_warps, num_stages, values)
        name = kernel.fn.__name__
        built.append(name)
        ptx = k.asm.get("ptx", "")
        pipe = ptx.count("cp.async.cg") + ptx.count("cp.async.ca") + ptx.count("cp.async.bulk")
        found = int32_offset_findings(k.asm["ttgir"])
        bad_offsets.extend(f"{name} {consts}: {f}" for f in found)
        log(f"{'FAIL' if found else 'ok'} {name:22s} {consts} warps={num_warps} stages={num_stages} "
            f"shared={k.metadata.shared} B async-copies={pipe} int32-offsets={len(found)} "
            f"({time.perf_counter() - t0:.1f} s)")
        if arch == 90 and k.metadata.shared > SM90_LIMITS.smem_per_block:
            raise RuntimeError(f"{name} {consts} stages={num_stages} needs {k.metadata.shared} B of shared memory, "
                               f"more than an sm_90 block may use ({SM90_LIMITS.smem_per_block} B)")

    def build_gemms(cfg: dict, dt: str, D: int = 4096, F: int = 14336) -> None:
        first, second = split_config(cfg)
        for kernel, c in ((fm._gate_up_kernel, first), (fm._down_kernel, second)):
            consts = dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                          GROUP_M=c["GROUP_M"], UPCAST=False, IEEE_FP32=dt == "fp32")
            sig, values = _gemm_sig(kernel, dt), _gemm_values(kernel.fn.__name__, D, F)
            if kernel is fm._down_kernel:
                split = fm.split_k(c, F)
                consts["SPLIT_K"] = split
                if split > 1:  # fp32 partial sums; each chunk of F a multiple of BLOCK_K
                    sig = dict(sig, slot_out_ptr="*fp32")
                    values["k_per_split"] = fm.k_per_split(c, F, split)
            build(kernel, sig, consts, c["num_warps"], c["num_stages"], values)

    dtypes = ["bf16"] if quick else ["bf16", "fp16", "fp32"]
    tokens = [1, 16384] if quick else [1, 300, 2000, 16384]
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    for dt in dtypes:
        for T in tokens:  # Mixtral shape: one config per token-count bucket
            build_gemms(get_config(T, 8, 2, 4096, 14336, names[dt]), dt)
        build(fm._combine_kernel, {"slot_out_ptr": "*" + dt, "topk_ids_ptr": "*i64", "y_ptr": "*" + dt,
                                   "D": "i32", "stride_op": "i32", "stride_os": "i32", "stride_yt": "i32"},
              dict(TOP_K=8, SPLIT_K=1, BLOCK_D=1024), values=dict(D=4096, stride_op=17 * 4096, stride_os=4096,
                                                                     stride_yt=4096))
    build(fm._combine_kernel, {"slot_out_ptr": "*fp32", "topk_ids_ptr": "*i64", "y_ptr": "*bf16", "D": "i32",
                               "stride_op": "i32", "stride_os": "i32", "stride_yt": "i32"},
          dict(TOP_K=8, SPLIT_K=4, BLOCK_D=1024), values=dict(D=7168, stride_op=17 * 8 * 7168, stride_os=7168,
                                                                 stride_yt=7168))  # split planes, DeepSeek-V3 D
    for sigmoid in ((False,) if quick else (False, True)):
        build(tg._topk_gating_kernel, {"logits_ptr": "*fp32", "ids_ptr": "*i64", "weights_ptr": "*fp32",
                                       "num_tokens": "i32", "num_experts": "i32", "stride_lt": "i32"},
              dict(TOP_K=8, BLOCK_T=16, BLOCK_E=256, BLOCK_K=8, SIGMOID=sigmoid, RENORMALIZE=True),
              values=dict(num_experts=256, stride_lt=256))
    if candidates:  # every distinct config the tuner may try (configs.candidate_configs)
        from .configs import candidate_configs

        seen = set()
        for E, K, D, F in ((8, 2, 4096, 14336), (128, 8, 2048, 768)):
            for T in (1, 16, 64, 256, 1024, 4096, 16384):
                for cfg in candidate_configs(T, E, K, D, F, 2, limit=16):
                    key = repr(sorted(split_config(cfg)[0].items()) + sorted(split_config(cfg)[1].items()))
                    if key not in seen:
                        seen.add(key)
                        build_gemms(cfg, "bf16", D, F)
        log(f"{len(seen)} distinct tuning candidates compiled")
    build(align._count_kernel, {"topk_ids_ptr": "*i64", "rank_ptr": "*i32", "chunk_counts_ptr": "*i32",
                                "num_slots": "i32", "num_chunks": "i32", "num_experts": "i32"},
          dict(BLOCK_S=32, BLOCK_E=256), num_warps=8, values=dict(num_experts=256))
    build(align._scan_kernel, {"chunk_counts_ptr": "*i32", "chunk_offsets_ptr": "*i32", "counts_ptr": "*i32",
                               "num_chunks": "i32"}, dict(BLOCK_C=1024))
    build(align._offsets_kernel, {"counts_ptr": "*i32", "expert_start_ptr": "*i32", "expert_ids_ptr": "*i32",
                                  "num_padded_ptr": "*i32", "num_experts": "i32", "num_blocks": "i32"},
          dict(BLOCK_M=16, BLOCK_E=256, BLOCK_B=64), values=dict(num_experts=256))
    for block_m in ((16,) if quick else (16, 64)):
        build(align._align_one_program_kernel,
              {"topk_ids_ptr": "*i64", "sorted_slot_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
               "num_padded_ptr": "*i32", "num_slots": "i32", "num_experts": "i32", "num_rows": "i32",
               "num_blocks": "i32"},
              dict(BLOCK_M=block_m, BLOCK_S=32, BLOCK_E=256, BLOCK_B=32, BLOCK_R=1024), values=dict(num_experts=256))
    build(align._scatter_kernel, {"topk_ids_ptr": "*i64", "rank_ptr": "*i32", "chunk_offsets_ptr": "*i32",
                                  "expert_start_ptr": "*i32", "sorted_slot_ids_ptr": "*i32", "num_slots": "i32",
                                  "num_chunks": "i32"}, dict(BLOCK_S=32))
    if bad_offsets:
        raise Int32OffsetError(f"{len(bad_offsets)} pointer offset(s) formed with a 32-bit multiply (widen the "
                               "operands with tl.cast(x, tl.int64) or .to(tl.int64) first):\n" + "\n".join(bad_offsets))
    return built


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = Hopper)")
    p.add_argument("--quick", action="store_true", help="bf16 and two token counts only")
    p.add_argument("--candidates", action="store_true", help="also every config the tuner may try (bf16)")
    args = p.parse_args(argv)
    try:
        built = compile_all(args.arch, args.quick, args.candidates)
    except Int32OffsetError as e:
        print(f"FAILED: {e}")
        return 1
    print(f"compiled {len(built)} kernels for sm_{args.arch}; no pointer offset formed in 32 bits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
