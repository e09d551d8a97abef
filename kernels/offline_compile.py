"""Compile the Triton kernels for a GPU architecture on a machine without one, and read their IR.

Triton's wheel ships ptxas, so the whole pipeline down to a cubin runs on a CPU: this is how the
test suite checks that every kernel variant compiles for Hopper and Jetson Orin, and how
bench/kernel_ir.py shows what the compiler made of the GEMM's main loop. Nothing is launched.

The modules must have been imported without TRITON_INTERPRET (interpreted kernels do not compile).
"""

from __future__ import annotations

import re
from collections import Counter

from ._triton import triton

# What a launch on real shapes specializes: pointers from torch's allocator and the model's
# N, K and strides are multiples of 16, M is never specialized (triton_gemm's do_not_specialize).
_ALIGNED_INTS = ("N", "K", "stride_am", "stride_wn", "stride_cm", "stride_ws", "stride_xm", "stride_qm")


def gemm_types(w4: bool, grouped: bool, raw: bool) -> dict[str, str]:
    """The pointer types of triton_gemm's kernel for one variant (the other arguments are int32)."""
    return {
        "a_ptr": "*i8", "w_ptr": "*u8" if w4 else "*i8", "c_ptr": "*i32" if raw else "*bf16",
        "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32", "zero_ptr": "*i32",
        "wsum_ptr": "*i32", "ws_ptr": "*fp32" if grouped else "*i32", "lock_ptr": "*i32",
    }  # fmt: skip


def compile_variant(kernel, types: dict[str, str], constants: dict, arch: int, **options):
    """triton.compile of `kernel` for sm_<arch> with these constexprs, specialized as a launch on real shapes would be.

    types: the pointer types (arguments not named are int32). options: num_warps, num_stages, ...
    Returns Triton's compiled kernel; its .asm holds "ttir", "ttgir", "ptx" and "cubin".
    """
    from triton.backends.compiler import GPUTarget

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    aligned = [n for n in names if n not in constants and (n.endswith("_ptr") or n in _ALIGNED_INTS)]
    source = triton.compiler.ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def main_loop_ops(ttgir: str) -> Counter:
    """Operations inside the loop that issues the tensor-core dots, counted by name, from TTGIR text.

    Also "wait pendings=N": warp_group_dot_wait by how many dots it leaves in flight (0: the
    wgmma is synchronous, the next K block's math waits for this one).
    """
    lines = ttgir.splitlines()
    ops: Counter = Counter()
    for start, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, body = 0, []
        for inner in lines[start:]:
            depth += inner.count("{") - inner.count("}")
            body.append(inner)
            if depth <= 0:
                break
        if not any("_dot" in b or "tt.dot" in b for b in body[1:]):
            continue
        for b in body[1:]:
            op = re.search(r"\b(tt|ttg|ttng|scf|arith)\.([a-z_]+)", b)
            if op:
                ops[f"{op.group(1)}.{op.group(2)}"] += 1
            wait = re.search(r"warp_group_dot_wait .*pendings = (\d+)", b)
            if wait:
                ops[f"wait pendings={wait.group(1)}"] += 1
        return ops
    return ops
