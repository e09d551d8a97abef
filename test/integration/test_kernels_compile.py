"""Every Triton kernel variant compiles to a Hopper (sm_90) and a Jetson Orin (sm_87) cubin on this CPU.

The interpreter tests check what the kernels compute, but the interpreter accepts constructs the
compiler rejects (and skips layout and register checks entirely). Triton's wheel ships ptxas,
so the whole pipeline down to SASS runs here without a GPU; nothing is launched. The kernels
must be decorated without TRITON_INTERPRET, hence a child process.
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_SCRIPT = r"""
import itertools
import math

import triton
from triton.backends.compiler import GPUTarget

from quantvla_kernels import triton_gemm, triton_quant, triton_transform


def compile_variant(kernel, types, constants, target, **options):
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in names}
    source = triton.compiler.ASTSource(
        fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()}
    )
    compiled = triton.compile(source, target=target, options=options)
    assert compiled.asm["cubin"], "no cubin"


count = 0
for arch in (90, 87):
    target = GPUTarget("cuda", arch, 32)
    # The GEMM: weight width, groups, K masks, split-K and the zero point, at an expert tile and (on
    # Hopper, where the prefix runs at full size) a prefix tile.
    tiles = ((16, 64, 128, 4, 4), (128, 128, 128, 8, 4))[: 2 if arch == 90 else 1]
    for w4, group, even_k, split_k, zero, raw, (bm, bn, bk, warps, stages) in itertools.product(
        (True, False), (0, 128), (True, False), (1, 4), (False, True), (False, True), tiles
    ):
        if raw and (group or zero):
            continue  # int_gemm has neither
        types = {
            "a_ptr": "*i8", "w_ptr": "*u8" if w4 else "*i8", "c_ptr": "*i32" if raw else "*bf16",
            "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32", "zero_ptr": "*i32",
            "wsum_ptr": "*i32", "ws_ptr": "*fp32" if group else "*i32", "lock_ptr": "*i32",
        }
        constants = dict(
            W4=w4, GROUP=group, HAS_BIAS=not raw, RAW=raw, SPLIT_K=split_k, ZERO=zero, EVEN_K=even_k,
            BM=bm, BN=bn, BK=bk, GROUP_M=8,
        )
        compile_variant(triton_gemm._gemm_kernel, types, constants, target,
                        num_warps=warps, num_stages=stages, enable_fp_fusion=False)
        count += 1
    # Row quantization: symmetric, asymmetric and static scales at int8 and int4.
    for qmax, (static, asym) in itertools.product((127, 7), ((False, False), (False, True), (True, False))):
        types = {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32", "zero_ptr": "*i32", "static_ptr": "*fp32"}
        constants = dict(QMAX=qmax, STATIC=static, ASYM=asym, BLOCK=2048)
        compile_variant(triton_quant._quantize_kernel, types, constants, target, num_warps=4)
        count += 1
    # The fused DuQuant transform: every step on, staged and not, and a plain smoothing-only layer.
    for steps, staged, asym, width in (((True,) * 4, True, False, 128), ((True,) * 4, False, True, 128),
                                       ((True, False, False, False), False, False, 64)):
        types = {
            "x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32", "zero_ptr": "*i32", "smooth_ptr": "*fp32",
            "signs1_ptr": "*i8", "perm_ptr": "*i64", "signs2_ptr": "*i8", "static_ptr": "*fp32",
            "scratch_ptr": "*fp32",
        }
        smooth, rot1, perm, rot2 = steps
        constants = dict(
            QMAX=127, SMOOTH=smooth, ROT1=rot1, PERM=perm, ROT2=rot2, STAGED=staged, STATIC=False, ASYM=asym,
            CB=2048 // width, B=width, LOG_B=width.bit_length() - 1, INV_SQRT_B=1 / math.sqrt(width),
        )
        compile_variant(triton_transform._transform_quantize_kernel, types, constants, target,
                        num_warps=4, enable_fp_fusion=False)
        count += 1
print(count)
"""


def test_every_kernel_variant_compiles_for_hopper_and_orin():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert int(result.stdout.split()[-1]) == 80 + 40 + 2 * (6 + 3)
