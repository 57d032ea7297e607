"""compile_check's int32 offset audit (int32_offset_findings): a 32-bit multiply must never feed an address.

Legend: TTGIR = Triton's GPU-level IR (MLIR text), the form the audit reads.
The flow rules are tested on small hand-written TTGIR; then two tiny kernels are really compiled for sm_90
(no GPU needed, TRITON_INTERPRET unset, so in a subprocess): the audit must fail the one that scales a
program id by a stride in 32 bits and pass the same kernel written with int64 offsets. That the shipped
kernels pass is tested with the whole compile_check run (test_kernels.py).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from moe_ref.kernels.compile_check import int32_offset_findings

_SIGNATURE = ('  tt.func public @k(%x_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32} loc("x_ptr"(#loc)), '
              '%n: i32 loc("n"(#loc)), %s: i32 loc("s"(#loc))) attributes {noinline = false} {\n')


def _func(body: str) -> str:
    """A TTGIR function around `body` (lines of ops), with a location table as Triton prints it."""
    return textwrap.dedent("""\
        #loc = loc("/src/k.py":1:0)
        module attributes {"ttg.num-warps" = 4 : i32} {
        """) + _SIGNATURE + textwrap.indent(textwrap.dedent(body), "    ") + textwrap.dedent("""\
            tt.return loc(#loc)
          } loc(#loc)
        } loc(#loc)
        #loc7 = loc("/src/k.py":7:5)
        #loc8 = loc("/src/k.py":8:9)
        #loc9 = loc("v"(#loc8))
        """)


def test_a_32_bit_product_into_an_address_is_found_with_its_source_line():
    found = int32_offset_findings(_func("""\
        %pid = tt.get_program_id x : i32 loc(#loc7)
        %off = arith.muli %pid, %s : i32 loc(#loc7)
        %p = tt.addptr %x_ptr, %off : !tt.ptr<f32>, i32 loc(#loc9)
        %v = tt.load %p : !tt.ptr<f32> loc(#loc8)
    """))
    assert len(found) == 1
    assert "arith.muli %pid, %s : i32" in found[0] and "(k.py:7)" in found[0] and "(k.py:8)" in found[0]


def test_widening_after_the_multiply_is_too_late_and_before_it_is_fine():
    late = int32_offset_findings(_func("""\
        %pid = tt.get_program_id x : i32 loc(#loc7)
        %r = tt.make_range {end = 128 : i32, start = 0 : i32} : tensor<128xi32, #blocked> loc(#loc7)
        %c = arith.constant dense<64> : tensor<128xi32, #blocked> loc(#loc7)
        %m = arith.muli %r, %c : tensor<128xi32, #blocked> loc(#loc7)
        %w = arith.extsi %m : tensor<128xi32, #blocked> to tensor<128xi64, #blocked> loc(#loc7)
        %b = tt.splat %x_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>, #blocked> loc(#loc8)
        %p = tt.addptr %b, %w : tensor<128x!tt.ptr<f32>, #blocked>, tensor<128xi64, #blocked> loc(#loc8)
    """))
    assert len(late) == 1 and "tensor<128xi32" in late[0]
    early = int32_offset_findings(_func("""\
        %pid = tt.get_program_id x : i32 loc(#loc7)
        %p64 = arith.extsi %pid : i32 to i64 loc(#loc7)
        %s64 = arith.extsi %s : i32 to i64 loc(#loc7)
        %off = arith.muli %p64, %s64 : i64 loc(#loc7)
        %p = tt.addptr %x_ptr, %off : !tt.ptr<f32>, i64 loc(#loc8)
    """))
    assert early == []


def test_loads_and_comparisons_stop_the_flow():
    found = int32_offset_findings(_func("""\
        %pid = tt.get_program_id x : i32 loc(#loc7)
        %m = arith.muli %pid, %s : i32 loc(#loc7)
        %ok = arith.cmpi slt, %m, %n : i32 loc(#loc7)
        %z = arith.constant 0 : i32 loc(#loc7)
        %sel = arith.select %ok, %pid, %z : i32 loc(#loc7)
        %p = tt.addptr %x_ptr, %sel : !tt.ptr<f32>, i32 loc(#loc8)
        %q = tt.addptr %x_ptr, %pid : !tt.ptr<f32>, i32 loc(#loc8)
        %v = tt.load %q : !tt.ptr<f32> loc(#loc8)
        %i = arith.fptosi %v : f32 to i32 loc(#loc8)
        %r = tt.addptr %x_ptr, %i : !tt.ptr<f32>, i32 loc(#loc8)
    """))
    assert found == []  # the product only decides a mask; a loaded value carries no product


def test_loop_carried_values_and_loop_results_are_followed():
    carried = int32_offset_findings(_func("""\
        %c0 = arith.constant 0 : i32 loc(#loc7)
        %c1 = arith.constant 1 : i32 loc(#loc7)
        %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %c0, %off = %c0) -> (i32, i32)  : i32 {
          %p = tt.addptr %x_ptr, %off : !tt.ptr<f32>, i32 loc(#loc8)
          %next = arith.muli %i, %s : i32 loc(#loc7)
          scf.yield %acc, %next : i32, i32 loc(#loc7)
        } loc(#loc7)
    """))
    assert len(carried) == 1 and "arith.muli %i, %s" in carried[0]  # reaches %off on the next iteration
    after = int32_offset_findings(_func("""\
        %c0 = arith.constant 0 : i32 loc(#loc7)
        %c1 = arith.constant 1 : i32 loc(#loc7)
        %r = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %c0) -> (i32)  : i32 {
          %m = arith.muli %i, %s : i32 loc(#loc7)
          %a = arith.addi %acc, %m : i32 loc(#loc7)
          scf.yield %a : i32 loc(#loc7)
        } loc(#loc7)
        %p = tt.addptr %x_ptr, %r : !tt.ptr<f32>, i32 loc(#loc8)
    """))
    assert len(after) == 1
    bounds = int32_offset_findings(_func("""\
        %c1 = arith.constant 1 : i32 loc(#loc7)
        %pid = tt.get_program_id x : i32 loc(#loc7)
        %lo = arith.muli %pid, %s : i32 loc(#loc7)
        scf.for %i = %lo to %n step %c1  : i32 {
          %p = tt.addptr %x_ptr, %i : !tt.ptr<f32>, i32 loc(#loc8)
        } loc(#loc7)
    """))
    assert len(bounds) == 1  # the induction variable starts at a 32-bit product


def test_results_of_regions_are_followed():
    found = int32_offset_findings(_func("""\
        %pid = tt.get_program_id x : i32 loc(#loc7)
        %m = arith.muli %pid, %s : i32 loc(#loc7)
        %t = tt.splat %m : i32 -> tensor<4xi32, #blocked> loc(#loc7)
        %sum = "tt.reduce"(%t) <{axis = 0 : i32}> ({
        ^bb0(%a: i32 loc(#loc7), %b: i32 loc(#loc7)):
          %ab = arith.addi %a, %b : i32 loc(#loc7)
          tt.reduce.return %ab : i32 loc(#loc7)
        }) : (tensor<4xi32, #blocked>) -> i32 loc(#loc7)
        %p = tt.addptr %x_ptr, %sum : !tt.ptr<f32>, i32 loc(#loc8)
    """))
    assert len(found) == 1


def test_an_address_it_cannot_read_is_an_error_not_a_pass():
    with pytest.raises(ValueError, match="tt.addptr"):
        int32_offset_findings(_func("""\
            %p = tt.addptr %x_ptr : !tt.ptr<f32> loc(#loc8)
        """))


_KERNELS = '''
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from moe_ref.kernels.compile_check import _build, int32_offset_findings


@triton.jit
def planes_i32(x_ptr, y_ptr, stride_p, PLANES: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(PLANES):  # plane p of x [PLANES, n]: p * stride_p in 32 bits
        acc += tl.load(x_ptr + p * stride_p + offs)
    tl.store(y_ptr + tl.program_id(0) * BLOCK + offs, acc)


@triton.jit
def planes_i64(x_ptr, y_ptr, stride_p, PLANES: tl.constexpr, BLOCK: tl.constexpr):
    stride_p = tl.cast(stride_p, tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(PLANES):
        acc += tl.load(x_ptr + p * stride_p + offs)
    tl.store(y_ptr + tl.program_id(0).to(tl.int64) * BLOCK + offs, acc)


sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "stride_p": "i32"}
for kernel in (planes_i32, planes_i64):
    k = _build(kernel, sig, dict(PLANES=4, BLOCK=256), GPUTarget("cuda", 90, 32), values=dict(stride_p=1 << 20))
    assert k.asm["cubin"], "no cubin"
    for f in int32_offset_findings(k.asm["ttgir"]):
        print(kernel.fn.__name__, f)
    print(kernel.fn.__name__, "done")
'''


@pytest.mark.slow  # compiles two kernels for sm_90
def test_the_audit_fails_a_compiled_32_bit_stride_product_and_passes_the_int64_one(tmp_path):
    script = tmp_path / "planes.py"  # a file: triton.jit reads the kernels' source
    script.write_text(_KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240,
                         cwd=os.path.dirname(__file__))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert "planes_i32 done" in lines and "planes_i64 done" in lines, res.stdout
    bad = [ln for ln in lines if ln.startswith("planes_i32 32-bit multiply")]
    good = [ln for ln in lines if ln.startswith("planes_i64 32-bit multiply")]
    assert good == [], good
    # p = 1, 2, 3 times stride_p (p = 0 folds away), and the store's program id times BLOCK
    assert len(bad) >= 2 and any("%stride_p" in ln and "planes.py:14" in ln for ln in bad), bad
    assert any("planes.py:15" in ln for ln in bad), bad
