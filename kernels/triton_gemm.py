"""W8A8, W4A8 and W4A4 GEMMs in Triton: int8 tensor-core dots, int32 accumulation, fused epilogue.

A is int8 [M, K] (int8 activations, or int4 values -7..7 in int8 for W4A4: Hopper has no int4
MMA). W is [N, K] with K contiguous, as nn.Linear stores it: int8, or uint8 [N, K / 2] packed
by packing.pack_int4 and sign-extended to int8 in registers. The epilogue follows
reference.scaled_int_matmul: acc_w = sum over groups of int32_partial_g * w_scale_g, then
y = acc_w * a_scale + bias, rounded once to the output dtype. With asymmetric activations each
group's int32 partial first loses zero_m * w_sum_g (the row's zero point times the precomputed
sum of that group's weight codes), in int32, exactly as the reference.

Split-K cuts K into SPLIT_K slices (grid axis 1) for small-M shapes whose output tiles alone
cannot fill the GPU. Each slice writes its partial tile to a workspace; the last slice to finish
a tile (counted with an atomic) sums the partials in slice order and runs the epilogue, so one
launch does the whole GEMM and results do not depend on which slice finishes last.

Requirements: K even for int4 weights; group_size a power of two >= 32 that divides K (one
group spans whole K blocks, and int8 MMAs consume K in steps of 32); K < 2**17 (int32).
"""

import torch

from ._triton import check_device, interpreted, tl, triton
from .reference import check_zero_point

_MAX_K = 2**17 - 1  # int32 holds K products of magnitude up to 2**14 only while K < 2**17


@triton.jit
def _unpack_int4(packed):
    """uint8 [R, C] holding element 2j in the low and 2j + 1 in the high nibble -> int8 [R, 2C]."""
    b = packed.to(tl.int8, bitcast=True)
    # Arithmetic shifts of a signed byte sign-extend each two's complement nibble.
    lo = (b << 4) >> 4
    hi = b >> 4
    return tl.join(lo, hi).reshape(packed.shape[0], 2 * packed.shape[1])


@triton.jit
def _dot_k_range(a_ptr, w_ptr, offs_m, offs_n, M, N, stride_am, stride_wn, k_start, k_end,
                 W4: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Exact int32 sum over k in [k_start, k_end) of A[m, k] * W[n, k] for one [BM, BN] tile."""
    acc = tl.full((BM, BN), 0, tl.int32)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[:, None] < N
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=m_ok & (offs_k[None, :] < k_end), other=0
        )
        if W4:
            # Byte j of a row holds k = 2j and 2j + 1; k_end is even, so no byte is split.
            offs_p = k0 // 2 + tl.arange(0, BK // 2)
            p = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_p[None, :],
                        mask=n_ok & (offs_p[None, :] < k_end // 2), other=0)  # fmt: skip
            w = _unpack_int4(p)
        else:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=n_ok & (offs_k[None, :] < k_end), other=0)  # fmt: skip
        # out_dtype spelled out: Triton 3.6 defaults it to float32 even for int8 operands.
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _zero_point_correction(zero_ptr, wsum_ptr, offs_m, offs_n, M, N, stride_sn):
    """zero_m * w_sum_n over a tile, int32: what the zero point adds to an asymmetric row's sum."""
    zero = tl.load(zero_ptr + offs_m, mask=offs_m < M, other=0)
    return zero[:, None] * tl.load(wsum_ptr + offs_n * stride_sn, mask=offs_n < N, other=0)[None, :]


@triton.jit
def _epilogue(acc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, zero_ptr, wsum_ptr, offs_m, offs_n, M, N,
              stride_cm, RAW: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
              ZERO: tl.constexpr):  # fmt: skip
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if RAW:
        y = acc
    else:
        if GROUP == 0:
            if ZERO:
                acc = acc - _zero_point_correction(zero_ptr, wsum_ptr, offs_m, offs_n, M, N, 1)
            w_scale = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            y = acc.to(tl.float32) * w_scale[None, :]
        else:
            y = acc  # already sum_g partial_g * w_scale_g in float32
        y = y * tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


# M changes with the prompt, so it is not specialized on: one compiled kernel serves every M.
@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(
    a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, zero_ptr, wsum_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_am, stride_wn, stride_cm, stride_sn, stride_ws,
    W4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, RAW: tl.constexpr, SPLIT_K: tl.constexpr,
    ZERO: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Tiles run in column bands GROUP_M tiles tall, so neighbouring programs share W in L2.
    pid = tl.program_id(0)
    grid_m = (M + BM - 1) // BM
    grid_n = (N + BN - 1) // BN
    band = GROUP_M * grid_n
    first_m = (pid // band) * GROUP_M
    band_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)

    # This program's slice of K, in whole groups (or whole K blocks without groups).
    pid_k = tl.program_id(1)
    unit = GROUP if GROUP > 0 else BK
    k_len = (K + SPLIT_K * unit - 1) // (SPLIT_K * unit) * unit
    k_start = pid_k * k_len
    k_end = min(K, k_start + k_len)
    if GROUP == 0:
        part = _dot_k_range(a_ptr, w_ptr, offs_m, offs_n, M, N, stride_am, stride_wn, k_start, k_end, W4, BM, BN, BK)
    else:
        # Group scales cannot enter an int32 sum: each group's exact sum is scaled in float32, in order.
        part = tl.full((BM, BN), 0, tl.float32)
        for g0 in range(k_start, k_end, GROUP):
            acc = _dot_k_range(a_ptr, w_ptr, offs_m, offs_n, M, N, stride_am, stride_wn, g0, g0 + GROUP, W4, BM, BN, BK)
            if ZERO:
                # w_sum [N, K / GROUP] has w_scale's layout: the group's column.
                acc = acc - _zero_point_correction(zero_ptr, wsum_ptr + g0 // GROUP, offs_m, offs_n, M, N, stride_sn)
            w_scale = tl.load(w_scale_ptr + offs_n * stride_sn + g0 // GROUP, mask=offs_n < N, other=0.0)
            part += acc.to(tl.float32) * w_scale.to(tl.float32)[None, :]

    if SPLIT_K == 1:
        _epilogue(part, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, zero_ptr, wsum_ptr, offs_m, offs_n, M, N,
                  stride_cm, RAW, GROUP, HAS_BIAS, ZERO)  # fmt: skip
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * stride_ws + tile, part, mask=mask)
        # Every thread's stores must be done before the release of the count publishes them.
        tl.debug_barrier()
        done = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            # Slice order, not finishing order, so float32 group sums are deterministic. .cg reads
            # from L2: the other slices' partials were written by other SMs.
            total = tl.full((BM, BN), 0, ws_ptr.dtype.element_ty)
            for s in range(SPLIT_K):
                total += tl.load(ws_ptr + s * stride_ws + tile, mask=mask, other=0, cache_modifier=".cg")
            _epilogue(total, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, zero_ptr, wsum_ptr, offs_m, offs_n, M, N,
                      stride_cm, RAW, GROUP, HAS_BIAS, ZERO)  # fmt: skip
            # Rearm the counter for the next launch, so the buffer is zeroed only once.
            tl.atomic_xchg(lock_ptr + pid, 0)


def _configs() -> list:
    # (BM, BN, BK, stages, warps). Large tiles for M ~ 1000 (compute-bound, wgmma wants BM >= 64),
    # thin ones for M ~ 50 (memory-bound: more CTAs and deeper K pipelines).
    large = [(128, 128, 128, 4, 8), (128, 256, 128, 3, 8), (128, 128, 64, 4, 4), (64, 128, 128, 4, 4),
             (64, 256, 128, 3, 8), (128, 64, 128, 4, 4)]  # fmt: skip
    small = [(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 4, 4),
             (32, 128, 256, 3, 4), (64, 64, 256, 3, 4), (16, 128, 256, 3, 4)]  # fmt: skip
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in dict.fromkeys(large + small)
    ]


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    m, group = named_args["M"], kwargs["GROUP"]
    kept = {}
    for c in configs:
        bm, bk = c.kwargs["BM"], c.kwargs["BK"]
        if (m <= 64 and bm > 64) or (m > 128 and bm < 64):
            continue
        if group:
            # One group spans whole K blocks; shrink BK rather than lose the config.
            bk = min(bk, group)
        kept[(bm, c.kwargs["BN"], bk, c.num_stages, c.num_warps)] = triton.Config(
            {**c.kwargs, "BK": bk}, num_stages=c.num_stages, num_warps=c.num_warps
        )
    return list(kept.values())


# The autotuner times configs on the GPU, so the interpreter gets one small fixed config. Its
# choices are kept on disk, so a policy's first inference after the first start (and every
# benchmark after bench/gemm.py on the same machine) skips the minutes of tuning.
_tuned = triton.autotune(
    configs=_configs(),
    key=["M", "N", "K", "W4", "GROUP", "RAW", "SPLIT_K", "ZERO"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(_gemm_kernel)
_INTERPRETER_CONFIG = {"BM": 16, "BN": 32, "BK": 32, "GROUP_M": 2}
_MIN_TILE = (16, 32)  # smallest BM, BN of any config above: sizes the split-K counters
_locks: dict[torch.device, torch.Tensor] = {}
# Outgrown counter sets stay allocated: a CUDA graph captured earlier still launches on them.
_outgrown_locks: list[torch.Tensor] = []


def _split_k_counters(device: torch.device, tiles: int) -> torch.Tensor:
    # Zeroed once and rearmed by the kernel. One set per device: split-K GEMMs on one device must
    # not run concurrently on different streams, and the first call must come before any CUDA
    # graph capture (as autotuning must anyway).
    locks = _locks.get(device)
    if locks is None or locks.numel() < tiles:
        if locks is not None:
            _outgrown_locks.append(locks)
        locks = _locks[device] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return locks


def pick_split_k(m: int, n: int, k: int, group_size: int | None, device: torch.device) -> int:
    """Slices of K that let a small-M GEMM fill the GPU: 1 unless output tiles leave most SMs idle."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(m, 64) * triton.cdiv(n, 128)  # typical tile counts of the tuned configs
    # Keep >= 512 of K (and >= one group) per slice so each slice still runs a pipelined loop.
    split = min(sms // tiles, k // max(512, group_size or 0), 16)
    return 1 if split < 2 else 1 << (split.bit_length() - 1)


def _check(fn: str, a_q: torch.Tensor, w: torch.Tensor, w_bits: int, group_size: int | None) -> tuple[int, int, int]:
    if a_q.dtype != torch.int8 or a_q.dim() != 2:
        raise ValueError(f"{fn}: a_q must be an int8 [M, K] tensor, got {a_q.dtype} {tuple(a_q.shape)}.")
    m, k = a_q.shape
    if w_bits == 8:
        if w.dtype != torch.int8 or w.shape[-1:] != (k,) or w.dim() != 2:
            raise ValueError(f"{fn}: 8-bit weights must be int8 [N, {k}], got {w.dtype} {tuple(w.shape)}.")
    elif w_bits == 4:
        if k % 2:
            raise ValueError(f"{fn}: int4 weights pack two codes per byte, so K must be even, got K={k}.")
        if w.dtype != torch.uint8 or w.shape[-1:] != (k // 2,) or w.dim() != 2:
            raise ValueError(
                f"{fn}: 4-bit weights must be uint8 [N, {k // 2}] (pack_int4), got {w.dtype} {tuple(w.shape)}."
            )
    else:
        raise ValueError(f"{fn}: w_bits must be 4 or 8, got {w_bits}.")
    if k > _MAX_K:
        raise ValueError(f"{fn}: K={k} could overflow the int32 accumulator, so K must be at most {_MAX_K}.")
    if group_size is not None and (group_size < 32 or group_size & (group_size - 1) or k % group_size):
        raise ValueError(f"{fn}: group_size must be a power of two >= 32 that divides K={k}, got {group_size}.")
    return m, k, w.shape[0]


def _check_config(fn: str, config: dict, group_size: int | None) -> dict:
    config = {"GROUP_M": 8, **config}
    if not {"BM", "BN", "BK"} <= set(config) <= {"BM", "BN", "BK", "GROUP_M", "num_warps", "num_stages"}:
        raise ValueError(f"{fn}: config needs BM, BN, BK and takes GROUP_M, num_warps, num_stages; got {config}.")
    if group_size and group_size % config["BK"]:
        raise ValueError(f"{fn}: a group must span whole K blocks, so BK must divide {group_size}, got {config}.")
    return config


def _launch(
    fn, a_q, w, out, a_scale, w_scale, bias, a_zero, w_sum, w_bits, group_size, raw, split_k, config
) -> torch.Tensor:
    (m, k), n = a_q.shape, w.shape[0]
    if split_k is None:
        split_k = pick_split_k(m, n, k, group_size, a_q.device)
    if split_k < 1:
        raise ValueError(f"{fn}: split_k must be at least 1, got {split_k}.")
    if config is None and interpreted(_gemm_kernel):
        config = _INTERPRETER_CONFIG
    if config is not None:
        config = _check_config(fn, config, group_size)
    a_q = a_q if a_q.stride(1) == 1 else a_q.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    check_device(fn, _gemm_kernel, a_q, w, out)
    if m == 0 or n == 0:
        return out
    ws = locks = out  # any pointer when unused
    if split_k > 1:
        ws_dtype = torch.float32 if group_size else torch.int32
        ws = torch.empty(split_k, m, n, dtype=ws_dtype, device=a_q.device)
        bm, bn = (config["BM"], config["BN"]) if config else _MIN_TILE
        locks = _split_k_counters(a_q.device, triton.cdiv(m, bm) * triton.cdiv(n, bn))
    args = (
        a_q, w, out, out if a_scale is None else a_scale, out if w_scale is None else w_scale,
        out if bias is None else bias, out if a_zero is None else a_zero, out if w_sum is None else w_sum, ws, locks,
        m, n, k, a_q.stride(0), w.stride(0), out.stride(0), 0 if w_scale is None else w_scale.stride(0),
        ws.stride(0) if split_k > 1 else 0,
    )  # fmt: skip
    meta = {
        "W4": w_bits == 4, "GROUP": group_size or 0, "HAS_BIAS": bias is not None, "RAW": raw, "SPLIT_K": split_k,
        "ZERO": a_zero is not None,
    }  # fmt: skip
    # No multiply-add fusion: the reference rounds after every float32 multiply and add, and so
    # the epilogue's output is bit-identical to it (but for split-K with group scales, which adds
    # the groups in another order).
    meta["enable_fp_fusion"] = False
    if config is not None:
        _gemm_kernel[(triton.cdiv(m, config["BM"]) * triton.cdiv(n, config["BN"]), split_k)](*args, **meta, **config)
    else:
        _tuned[lambda c: (triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"]), split_k)](*args, **meta)
    return out


def int_gemm(
    a_q: torch.Tensor,
    w: torch.Tensor,
    w_bits: int,
    split_k: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Exact a_q @ unpack(w).T as int32 [M, N]: the raw accumulator, as reference.int_matmul.

    split_k, out, config: as for scaled_int_gemm.
    """
    m, _, n = _check("int_gemm", a_q, w, w_bits, None)
    if out is None:
        out = torch.empty(m, n, dtype=torch.int32, device=a_q.device)
    elif out.shape != (m, n) or out.dtype != torch.int32:
        raise ValueError(f"int_gemm: out must be int32 [{m}, {n}], got {out.dtype} {tuple(out.shape)}.")
    return _launch("int_gemm", a_q, w, out, None, None, None, None, None, w_bits, None, True, split_k, config)


def scaled_int_gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_bits: int,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    split_k: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    a_zero: torch.Tensor | None = None,
    w_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """((a_q - a_zero) * a_scale) @ (unpack(w) * w_scale).T + bias as [M, N] out_dtype, as
    reference.scaled_int_matmul.

    a_scale float [M, 1]; w_scale float [N] (per channel) or [N, K / group_size]; bias float [N].
    a_zero int32 [M, 1] and w_sum int32 shaped as w_scale (reference.code_sums): asymmetric activations.
    split_k: slices of K (None picks one from the shape, see pick_split_k). out: preallocated output.
    config: fixed tiles {BM, BN, BK[, GROUP_M, num_warps, num_stages]} instead of the autotuner's
    choice (always fixed in the interpreter).
    """
    m, k, n = _check("scaled_int_gemm", a_q, w, w_bits, group_size)
    if not a_scale.is_floating_point() or a_scale.shape != (m, 1):
        raise ValueError(
            f"scaled_int_gemm: a_scale must be float [{m}, 1], got {a_scale.dtype} {tuple(a_scale.shape)}."
        )
    w_scale_shape = (n,) if group_size is None else (n, k // group_size)
    if not w_scale.is_floating_point() or w_scale.shape != w_scale_shape:
        raise ValueError(
            f"scaled_int_gemm: w_scale must be float {list(w_scale_shape)}, got {w_scale.dtype} {tuple(w_scale.shape)}."
        )
    if bias is not None and (not bias.is_floating_point() or bias.shape != (n,)):
        raise ValueError(f"scaled_int_gemm: bias must be float [{n}], got {bias.dtype} {tuple(bias.shape)}.")
    check_zero_point("scaled_int_gemm", a_zero, w_sum, m, w_scale_shape, k)
    if a_zero is not None:
        a_zero = a_zero.reshape(m).contiguous()
        w_sum = w_sum.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    elif out.shape != (m, n) or out.dtype != out_dtype:
        raise ValueError(f"scaled_int_gemm: out must be {out_dtype} [{m}, {n}], got {out.dtype} {tuple(out.shape)}.")
    # Scales and bias are read along one axis: a_scale's row stride is its element stride.
    a_scale = a_scale.reshape(m).contiguous()
    # Contiguous, so that w_sum (same shape) is read with w_scale's strides.
    w_scale = w_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    check_device("scaled_int_gemm", _gemm_kernel, a_scale, w_scale, *([] if bias is None else [bias]))
    return _launch(
        "scaled_int_gemm",
        a_q,
        w,
        out,
        a_scale,
        w_scale,
        bias,
        a_zero,
        w_sum,
        w_bits,
        group_size,
        False,
        split_k,
        config,
    )
