#!/usr/bin/env bash
# Everything this project still has to measure on a GPU, as one call of a lent H100/H200:
#
#     bash bench/gpu_session.sh [gemm] [e2e] [groot] [smolvla]    # default: gemm e2e
#
# A lease gives 15 device minutes (start included) and one command at most 10. With a cold
# Triton cache the autotuner dominates: bench/gemm.py tunes 14 shapes x 3 kernels x 2 split-K
# modes, about 84 keys of ~8 configs at ~0.5 s each (compile + timing), so about 6 minutes,
# plus ~1.5 minutes of timing. Estimates, not measurements (no card has run this yet), hence
# the limits per step and bench/gemm.py and bench/e2e.py rewriting their JSON after every row:
#   call 1, timeout_s=600: `gemm e2e` (gemm cut at 7 minutes, e2e at 2.5);
#   call 2, while the card is warm: `groot` (under 4 minutes), and `gemm` again if call 1 cut
#   it short (the autotuner's choices are then on disk and only the timing remains).
# `smolvla` when a later lease has room.
# gemm   bench/gemm.py: every Triton kernel checked against the exact reference on the card,
#        then timed against cuBLAS bf16, torch._int_mm and fp8 _scaled_mm (issue #4's targets)
# e2e    bench/e2e.py: full-size π0.5, bf16 eager vs the engine, float vs QuantVLA W4A8/W4A4 (#8)
# groot  bench/e2e.py --model groot: full-size GR00T N1.5, the same variants (#8)
# smolvla  bench/e2e.py --model smolvla: full-size SmolVLA, the same variants
#
# The machine has torch, Triton and the rest (see .library/device/KINDS.md) but not this
# package: it runs from the source tree, `quantvla_kernels` through a link to kernels/. Do not
# pip-install requirements.txt there (it pins the CPU torch and Triton 3.9; the kernels also
# build with the card's Triton 3.6). Results and logs go to $OUT (the device tool returns them);
# each step has its own time limit so one slow step still leaves the others' figures.
set -uo pipefail
OUT=${OUT:-build/gpu_session}
mkdir -p "$OUT" /tmp/quantvla_path
ln -sfn "$PWD/kernels" /tmp/quantvla_path/quantvla_kernels
export PYTHONPATH="$PWD:/tmp/quantvla_path" PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(gemm e2e)

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/card.txt"

for step in "${steps[@]}"; do
    case "$step" in
        gemm) timeout 420 python3 bench/gemm.py --warmup 10 --rep 50 --json "$OUT/gemm.json" 2>&1 | tee "$OUT/gemm.log" ;;
        e2e) timeout 150 python3 bench/e2e.py --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" ;;
        groot) timeout 200 python3 bench/e2e.py --model groot --json "$OUT/e2e_groot.json" 2>&1 | tee "$OUT/e2e_groot.log" ;;
        smolvla) timeout 200 python3 bench/e2e.py --model smolvla --json "$OUT/e2e_smolvla.json" 2>&1 | tee "$OUT/e2e_smolvla.log" ;;
        *) echo "unknown step $step: use gemm, e2e, groot or smolvla" >&2; exit 2 ;;
    esac
    echo "$step exited with $?" | tee -a "$OUT/card.txt"
done
