"""What Triton makes of the integer GEMM's main loop on Hopper, read from its IR on any machine.

    python bench/kernel_ir.py --out build/kernel_ir [--arch 90]

Compiles quantvla_kernels' GEMM (quantvla_kernels.offline_compile: no GPU needed, nothing runs)
for W8A8 and W4A8 at a prefix tile (128 x 128 x 128, 8 warps, 4 stages) and an expert tile
(16 x 64 x 128, 4 warps), writes each variant's TTGIR and PTX, and counts what the K loop does:
pipelined loads (async_copy_global_to_local), shared-memory round trips of operands produced in
registers (local_alloc, local_load), the tensor-core dots (warp_group_dot on Hopper) and how
many dots each wait leaves in flight (pendings=0: every wgmma waits for the previous one).
The IR is the installed Triton's; the GPU machine's Triton may lower differently.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

VARIANTS = [
    # label, W4, (BM, BN, BK, warps, stages)
    ("W8A8 prefix tile", False, (128, 128, 128, 8, 4)),
    ("W4A8 prefix tile", True, (128, 128, 128, 8, 4)),
    ("W8A8 expert tile", False, (16, 64, 128, 4, 4)),
    ("W4A8 expert tile", True, (16, 64, 128, 4, 4)),
]
COLUMNS = [
    ("ttg.async_copy_global_to_local", "async loads"),
    ("ttg.local_alloc", "local_alloc"),
    ("ttg.local_load", "local_load"),
    ("ttng.warp_group_dot", "wgmma"),
    ("tt.dot", "mma"),
    ("wait pendings=0", "wait(0)"),
    ("wait pendings=1", "wait(1)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/kernel_ir", help="folder for the TTGIR and PTX files")
    parser.add_argument("--arch", type=int, default=90, help="sm_ architecture (90: H100/H200, 87: Orin)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench/kernel_ir.py: unset TRITON_INTERPRET; interpreted kernels do not compile.")

    import triton

    from quantvla_kernels import triton_gemm
    from quantvla_kernels.offline_compile import compile_variant, gemm_types, main_loop_ops

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"Triton {triton.__version__}, sm_{args.arch}; counts inside the K loop")
    print(f"{'variant':<20}" + "".join(f"{title:>13}" for _, title in COLUMNS))
    for label, w4, (bm, bn, bk, warps, stages) in VARIANTS:
        constants = dict(
            W4=w4, GROUP=0, HAS_BIAS=True, RAW=False, SPLIT_K=1, ZERO=False, EVEN_K=True,
            BM=bm, BN=bn, BK=bk, GROUP_M=8,
        )  # fmt: skip
        compiled = compile_variant(
            triton_gemm._gemm_kernel, gemm_types(w4, False, False), constants, args.arch,
            num_warps=warps, num_stages=stages, enable_fp_fusion=False,
        )  # fmt: skip
        stem = out / label.replace(" ", "_")
        stem.with_suffix(".ttgir").write_text(compiled.asm["ttgir"])
        stem.with_suffix(".ptx").write_text(compiled.asm["ptx"])
        ops = main_loop_ops(compiled.asm["ttgir"])
        print(f"{label:<20}" + "".join(f"{ops.get(op, 0):>13}" for op, _ in COLUMNS))
    print(f"TTGIR and PTX in {out}/")


if __name__ == "__main__":
    main()
