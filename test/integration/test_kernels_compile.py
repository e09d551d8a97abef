"""Every Triton kernel variant compiles to a Hopper (sm_90) and a Jetson Orin (sm_87) cubin on this CPU.

The interpreter tests check what the kernels compute, but the interpreter accepts constructs the
compiler rejects (and skips layout and register checks entirely). quantvla_kernels.offline_compile
runs the whole pipeline down to a cubin here without a GPU, specialized as a launch on model
shapes is (aligned pointers, N, K and strides), which is what switches on the pipelined loads.
The kernels must be decorated without TRITON_INTERPRET, hence a child process.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_SCRIPT = r"""
import itertools
import json
import math

from quantvla_kernels import triton_gemm, triton_quant, triton_transform
from quantvla_kernels.offline_compile import compile_variant, gemm_types, main_loop_ops


def check(kernel, types, constants, arch, **options):
    assert compile_variant(kernel, types, constants, arch, **options).asm["cubin"], "no cubin"


count = 0
for arch in (90, 87):
    # The GEMM: weight width, groups, K masks, split-K and the zero point, at an expert tile and (on
    # Hopper, where the prefix runs at full size) a prefix tile.
    tiles = ((16, 64, 128, 4, 4), (128, 128, 128, 8, 4))[: 2 if arch == 90 else 1]
    for w4, group, even_k, split_k, zero, raw, (bm, bn, bk, warps, stages) in itertools.product(
        (True, False), (0, 128), (True, False), (1, 4), (False, True), (False, True), tiles
    ):
        if raw and (group or zero):
            continue  # int_gemm has neither
        constants = dict(
            W4=w4, GROUP=group, HAS_BIAS=not raw, RAW=raw, SPLIT_K=split_k, ZERO=zero, EVEN_K=even_k,
            BM=bm, BN=bn, BK=bk, GROUP_M=8,
        )
        check(triton_gemm._gemm_kernel, gemm_types(w4, bool(group), raw), constants, arch,
              num_warps=warps, num_stages=stages, enable_fp_fusion=False)
        count += 1
    # Row quantization: symmetric, asymmetric and static scales at int8 and int4.
    for qmax, (static, asym) in itertools.product((127, 7), ((False, False), (False, True), (True, False))):
        types = {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32", "zero_ptr": "*i32", "static_ptr": "*fp32"}
        constants = dict(QMAX=qmax, STATIC=static, ASYM=asym, BLOCK=2048)
        check(triton_quant._quantize_kernel, types, constants, arch, num_warps=4)
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
        check(triton_transform._transform_quantize_kernel, types, constants, arch,
              num_warps=4, enable_fp_fusion=False)
        count += 1
# The prefix tile's K loop on Hopper, as bench/kernel_ir.py reads it.
loops = {}
for w4 in (False, True):
    constants = dict(W4=w4, GROUP=0, HAS_BIAS=True, RAW=False, SPLIT_K=1, ZERO=False, EVEN_K=True,
                     BM=128, BN=128, BK=128, GROUP_M=8)
    ttgir = compile_variant(triton_gemm._gemm_kernel, gemm_types(w4, False, False), constants, 90,
                            num_warps=8, num_stages=4, enable_fp_fusion=False).asm["ttgir"]
    loops["W4" if w4 else "W8"] = dict(main_loop_ops(ttgir))
print(json.dumps(loops))
print(count)
"""


def test_every_kernel_variant_compiles_for_hopper_and_orin():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    loops, count = result.stdout.strip().splitlines()[-2:]
    assert int(count) == 80 + 40 + 2 * (6 + 3)
    loops = json.loads(loops)
    for w in ("W8", "W4"):
        # One Hopper wgmma per K block, fed by two pipelined global->shared loads (A and W).
        assert loops[w]["ttng.warp_group_dot"] == 1 and loops[w]["ttg.async_copy_global_to_local"] == 2, loops
    # int8 weights go from shared memory straight into the wgmma; no register round trip.
    assert loops["W8"].get("ttg.local_alloc", 0) == 0 and loops["W8"].get("ttg.local_load", 0) == 0, loops
