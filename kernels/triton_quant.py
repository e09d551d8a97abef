"""Per-token (symmetric or with a zero point) or static per-channel activation quantization in one Triton launch.

Bit-identical to quantize.quantize_per_token / quantize_per_token_asym / quantize_per_channel:
the same float32 divisions, correctly rounded, and the same round-half-to-even.
"""

import torch

from ._triton import check_device, interpreted, tl, triton

# Adding then subtracting 1.5 * 2**23 rounds a float32 |v| <= 2**22 to an integer, half to even,
# through the hardware's own round-to-nearest-even. libdevice.rint would say the same, but the
# interpreter cannot run libdevice; float adds are never reassociated without fast-math flags.
_ROUND_MAGIC = tl.constexpr(12582912.0)
# A row of up to this many elements is read in one block; longer rows loop over blocks.
_MAX_BLOCK = 8192


# tl.max's own combine function is one of triton's @jit helpers, which _triton.py explains we avoid.
@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def round_half_even(v):
    # Exact for |v| <= 2**22, which every caller keeps to.
    return (v + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def asym_step_zero(lo, hi, LEVELS: tl.constexpr):
    """quantize_per_token_asym's step and zero point (unshifted) from a row's range, lo <= 0 <= hi."""
    step = tl.maximum(tl.math.div_rn(hi - lo, LEVELS * 1.0), 1.1754943508222875e-38)
    return step, round_half_even(tl.math.div_rn(-lo, step))


@triton.jit
def asym_codes(v, zero, LEVELS: tl.constexpr):
    """int8 codes of v = x / step: round, add the zero point, clamp to the unsigned grid, shift to signed."""
    u = tl.minimum(tl.maximum(round_half_even(v) + zero, 0.0), LEVELS * 1.0)
    return (u - (LEVELS + 1) // 2).to(tl.int8)


@triton.jit
def _quantize_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    zero_ptr,
    static_ptr,
    K,
    stride_xm,
    stride_qm,
    QMAX: tl.constexpr,
    STATIC: tl.constexpr,
    ASYM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    zero = 0.0
    if STATIC:
        # Calibrated per-channel scales live in the weight; the row scale is 1.
        scale = 1.0
    elif ASYM:
        # The row's range, widened to include 0.
        lo = 0.0
        hi = 0.0
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.reduce(x, 0, _minimum))
            hi = tl.maximum(hi, tl.reduce(x, 0, _maximum))
        scale, zero = asym_step_zero(lo, hi, 2 * QMAX + 1)
        tl.store(zero_ptr + row, (zero - (QMAX + 1)).to(tl.int32))
    else:
        amax = 0.0
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.reduce(tl.abs(x), 0, _maximum))
        # div_rn: Triton's `/` on float32 is an approximate division on CUDA, torch's is exact.
        # A zero row gets the smallest normal scale, so x / scale is 0 rather than NaN.
        scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), 1.1754943508222875e-38)
    tl.store(scale_ptr + row, scale)
    # Second sweep over the row: it was just read, so it comes from cache, not DRAM.
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            v = tl.math.div_rn(x, tl.load(static_ptr + offs, mask=mask, other=1.0).to(tl.float32))
        else:
            v = tl.math.div_rn(x, scale)
        if ASYM:
            q = asym_codes(v, zero, 2 * QMAX + 1)
        else:
            # Clamp before rounding: the same result (qmax is an integer) and it keeps |v| in the
            # range where the magic-number rounding is exact.
            q = round_half_even(tl.minimum(tl.maximum(v, -QMAX * 1.0), QMAX * 1.0)).to(tl.int8)
        tl.store(q_row + offs, q, mask=mask)


def quantize_rows(
    x: torch.Tensor,
    bits: int,
    static_scale: torch.Tensor | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
    asymmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x float [M, K] -> (q int8 [M, K], row scale float32 [M, 1], zero point), as quantize_per_token(x, bits)
    with zero None; with asymmetric=True as quantize_per_token_asym(x, bits), zero int32 [M, 1].

    With static_scale [K] it is quantize_per_channel(x, static_scale, bits) instead (row scale 1).
    bits 4 gives int4 values held in int8, which is what the GEMMs read for W4A4.
    out: preallocated (q, scale) or, asymmetric, (q, scale, zero) to write into (tests poison them).
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize_rows: bits must be 4 or 8, got {bits}.")
    if x.dim() != 2 or not x.is_floating_point() or x.shape[1] == 0:
        raise ValueError(f"quantize_rows: x must be a float [M, K] tensor with K > 0, got {x.dtype} {tuple(x.shape)}.")
    m, k = x.shape
    if static_scale is not None and static_scale.shape != (k,):
        raise ValueError(f"quantize_rows: static_scale must be [K]=[{k}], got {tuple(static_scale.shape)}.")
    if static_scale is not None and asymmetric:
        raise ValueError("quantize_rows: static per-channel scales are symmetric; a zero point needs per-token scales.")
    x = x if x.stride(1) == 1 else x.contiguous()
    q, scale, zero = rows_out("quantize_rows", x, out, asymmetric)
    static = x if static_scale is None else static_scale.contiguous()  # any pointer when unused
    check_device("quantize_rows", _quantize_kernel, x, static, q, scale)
    if m:
        block = min(triton.next_power_of_2(k), _MAX_BLOCK)
        warps = 1 if interpreted(_quantize_kernel) else max(1, min(16, block // 512))
        _quantize_kernel[(m,)](
            x, q, scale, scale if zero is None else zero, static, k, x.stride(0), q.stride(0),
            QMAX=2 ** (bits - 1) - 1, STATIC=static_scale is not None, ASYM=asymmetric, BLOCK=block,
            num_warps=warps,
        )  # fmt: skip
    return q, scale, zero


def rows_out(
    fn: str, x: torch.Tensor, out: tuple[torch.Tensor, ...] | None, asymmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The (q, scale, zero) a row quantizer writes: `out` checked, or new tensors; zero None when symmetric."""
    m, k = x.shape
    want = [((m, k), torch.int8), ((m, 1), torch.float32)] + ([((m, 1), torch.int32)] if asymmetric else [])
    if out is None:
        made = [torch.empty(shape, dtype=dtype, device=x.device) for shape, dtype in want]
    else:
        made = list(out)
        if len(made) != len(want) or any(t.shape != s or t.dtype != dt for t, (s, dt) in zip(made, want, strict=True)):
            raise ValueError(f"{fn}: out must be {', '.join(f'{dt} {list(shape)}' for shape, dt in want)}.")
    return made[0], made[1], made[2] if asymmetric else None
