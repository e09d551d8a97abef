"""A DuQuant-style input transform fused with per-token activation quantization, in one Triton launch.

x -> x / smooth -> block Hadamard with signs (R1) -> channel permutation -> block Hadamard with
signs (R2) -> quantize rows, any subset of the steps: the transform of
quantvla_ros.quant.transforms.InputTransform.apply on float32 x, then quantize_per_token,
quantize_per_token_asym or quantize_per_channel. Each Hadamard block runs as log2 b butterflies
(u + v, u - v), where the torch transform does one b × b product: the two agree to float32
rounding, and this kernel is bit-identical to the butterflies written in torch (the tests'). Dense rotation blocks
(the "svd" option) are not fused; their owners keep the torch transform.

One program per row, three sweeps over it in chunks of whole rotation blocks:
1. x -> smooth -> R1 -> a float32 scratch row, only when a permutation follows those steps. The
   permutation mixes channels across blocks, so R2's inputs for one block exist only once R1
   has run on the whole row. The scratch is written and read back by the same program (a CTA
   barrier in between), so its gathers hit L1/L2; its only DRAM cost is the write-back of
   4 bytes per element that L2 eventually evicts.
2. gather (permute) from the scratch -> R2 -> the row's absmax, or its min and max with a zero
   point (skipped for static scales).
3. the same again, then divide by the scale, round, store int8.
Sweeps 2 and 3 recompute the gather and R2 (log2 b adds per element) rather than keep a whole
row in registers, so any K works with no spills: on a GPU x is read once from DRAM and the
kernel moves about 2 (bf16 x) + 4 (scratch) + 1 (codes) bytes per element, against ~45 launches
that each read and write the float32 activations on the unfused torch path.
"""

import math

import torch

from ._triton import check_device, interpreted, tl, triton
from .triton_quant import asym_codes, asym_step_zero, round_half_even, rows_out

# Elements per chunk: enough to keep a GPU's loads in flight, few enough that a chunk and the
# butterflies' temporaries stay in registers (16 floats a thread at 8 warps).
_MAX_CHUNK = 4096
# The tile width when there is no rotation (any power of two works; the chunk size is what counts).
_PLAIN_WIDTH = 64


# Triton's own max and min combine functions (not tl.max, see _triton.py): the interpreter recognizes
# them and reduces with numpy without calling them, where a combine function of ours runs once per element.
_MAX_COMBINE = tl.standard._elementwise_max
_MIN_COMBINE = tl.standard._elementwise_min


@triton.jit
def _butterfly(t, CB: tl.constexpr, B: tl.constexpr, H: tl.constexpr):
    # Sylvester's H_2h = [[H_h, H_h], [H_h, -H_h]]: the halves u, v of each 2h run of a block become
    # u + v and u - v: b log2 b adds, where a b × b product takes b² multiply-adds.
    u, v = tl.split(tl.permute(tl.reshape(t, (CB, B // (2 * H), 2, H)), (0, 1, 3, 2)))
    return tl.reshape(tl.permute(tl.join(u + v, u - v), (0, 1, 3, 2)), (CB, B))


@triton.jit
def _rotate(t, signs_ptr, offs, mask, CB: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr, INV_SQRT_B: tl.constexpr):
    """t [CB, B], whole blocks of channels offs, times blockdiag(diag(signs) H_B / √B)."""
    t = t * tl.load(signs_ptr + offs, mask=mask, other=0).to(tl.float32)
    for s in tl.static_range(LOG_B):
        t = _butterfly(t, CB, B, 1 << s)
    # A float32 constant, as torch multiplies a float32 tensor by a Python float.
    return t * INV_SQRT_B


@triton.jit
def _before_perm(x_row, offs, mask, smooth_ptr, signs1_ptr, SMOOTH: tl.constexpr, ROT1: tl.constexpr,
                 CB: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr, INV_SQRT_B: tl.constexpr):  # fmt: skip
    t = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if SMOOTH:
        # div_rn: Triton's `/` on float32 is an approximate division on CUDA, torch's is exact.
        t = tl.math.div_rn(t, tl.load(smooth_ptr + offs, mask=mask, other=1.0))
    if ROT1:
        t = _rotate(t, signs1_ptr, offs, mask, CB, B, LOG_B, INV_SQRT_B)
    return t


@triton.jit
def _transformed(x_row, scratch_row, offs, mask, smooth_ptr, signs1_ptr, perm_ptr, signs2_ptr,
                 SMOOTH: tl.constexpr, ROT1: tl.constexpr, PERM: tl.constexpr, ROT2: tl.constexpr,
                 STAGED: tl.constexpr, CB: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr,
                 INV_SQRT_B: tl.constexpr):  # fmt: skip
    """The fully transformed channels offs of one row, float32 [CB, B]."""
    if PERM:
        src = tl.load(perm_ptr + offs, mask=mask, other=0)
        if STAGED:
            t = tl.load(scratch_row + src, mask=mask, other=0.0)
        else:
            t = tl.load(x_row + src, mask=mask, other=0.0).to(tl.float32)
    else:
        t = _before_perm(x_row, offs, mask, smooth_ptr, signs1_ptr, SMOOTH, ROT1, CB, B, LOG_B, INV_SQRT_B)
    if ROT2:
        t = _rotate(t, signs2_ptr, offs, mask, CB, B, LOG_B, INV_SQRT_B)
    return t


@triton.jit
def _transform_quantize_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, smooth_ptr, signs1_ptr, perm_ptr, signs2_ptr, static_ptr, scratch_ptr,
    K, stride_xm, stride_qm,
    QMAX: tl.constexpr, SMOOTH: tl.constexpr, ROT1: tl.constexpr, PERM: tl.constexpr, ROT2: tl.constexpr,
    STAGED: tl.constexpr, STATIC: tl.constexpr, ASYM: tl.constexpr, CB: tl.constexpr, B: tl.constexpr,
    LOG_B: tl.constexpr, INV_SQRT_B: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    scratch_row = scratch_ptr + row * K
    # Chunks hold whole blocks (K is a multiple of B when there are rotations), so a block is
    # either all in or all masked out and the butterflies never mix in padding.
    tile = tl.arange(0, CB)[:, None] * B + tl.arange(0, B)[None, :]
    # STAGED (a permutation after smoothing or R1): those steps run once per row, into the scratch
    # row the gathers read.
    if STAGED:
        for k0 in range(0, K, CB * B):
            offs = k0 + tile
            mask = offs < K
            t = _before_perm(x_row, offs, mask, smooth_ptr, signs1_ptr, SMOOTH, ROT1, CB, B, LOG_B, INV_SQRT_B)
            tl.store(scratch_row + offs, t, mask=mask)
        # The gathers below read elements other threads of this program stored; a CTA barrier
        # makes its global writes visible to all its threads.
        tl.debug_barrier()

    zero = 0.0
    if STATIC:
        # Calibrated per-channel scales live in the weight; the row scale is 1.
        scale = 1.0
    elif ASYM:
        # The transformed row's range, widened to include 0.
        lo = 0.0
        hi = 0.0
        for k0 in range(0, K, CB * B):
            offs = k0 + tile
            mask = offs < K
            t = _transformed(x_row, scratch_row, offs, mask, smooth_ptr, signs1_ptr, perm_ptr, signs2_ptr,
                             SMOOTH, ROT1, PERM, ROT2, STAGED, CB, B, LOG_B, INV_SQRT_B)  # fmt: skip
            lo = tl.minimum(lo, tl.reduce(t, None, _MIN_COMBINE))
            hi = tl.maximum(hi, tl.reduce(t, None, _MAX_COMBINE))
        scale, zero = asym_step_zero(lo, hi, 2 * QMAX + 1)
        tl.store(zero_ptr + row, (zero - (QMAX + 1)).to(tl.int32))
    else:
        amax = 0.0
        for k0 in range(0, K, CB * B):
            offs = k0 + tile
            mask = offs < K
            t = _transformed(x_row, scratch_row, offs, mask, smooth_ptr, signs1_ptr, perm_ptr, signs2_ptr,
                             SMOOTH, ROT1, PERM, ROT2, STAGED, CB, B, LOG_B, INV_SQRT_B)  # fmt: skip
            amax = tl.maximum(amax, tl.reduce(tl.abs(t), None, _MAX_COMBINE))
        # A zero row gets the smallest normal scale, so t / scale is 0 rather than NaN.
        scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), 1.1754943508222875e-38)
    tl.store(scale_ptr + row, scale)

    for k0 in range(0, K, CB * B):
        offs = k0 + tile
        mask = offs < K
        t = _transformed(x_row, scratch_row, offs, mask, smooth_ptr, signs1_ptr, perm_ptr, signs2_ptr,
                         SMOOTH, ROT1, PERM, ROT2, STAGED, CB, B, LOG_B, INV_SQRT_B)  # fmt: skip
        if STATIC:
            v = tl.math.div_rn(t, tl.load(static_ptr + offs, mask=mask, other=1.0))
        else:
            v = tl.math.div_rn(t, scale)
        if ASYM:
            q = asym_codes(v, zero, 2 * QMAX + 1)
        else:
            # Clamp before rounding: the same result (qmax is an integer), and |v| stays in the range
            # where the magic-number rounding is exact.
            q = round_half_even(tl.minimum(tl.maximum(v, -QMAX * 1.0), QMAX * 1.0)).to(tl.int8)
        tl.store(q_row + offs, q, mask=mask)


def _check_step(name: str, t: torch.Tensor | None, dtypes: tuple[torch.dtype, ...], shape: tuple, want: str) -> None:
    if t is not None and (t.dtype not in dtypes or t.shape != shape):
        raise ValueError(f"transform_quantize_rows: {name} must be {want}, got {t.dtype} {tuple(t.shape)}.")


def transform_quantize_rows(
    x: torch.Tensor,
    bits: int,
    smooth: torch.Tensor | None = None,
    signs1: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    signs2: torch.Tensor | None = None,
    static_scale: torch.Tensor | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
    asymmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x float [M, K] -> transform -> (q int8 [M, K], row scale float32 [M, 1], zero point) in one launch.

    The steps, each optional, run in this order: divide by smooth (float32 [K]), rotate by signs1
    (int8 [K / b, b] of ±1: blockdiag(diag(signs1) H_b / √b), b a power of two), permute by perm
    (int64 [K], a permutation of range(K), unchecked: new channel m is old channel perm[m]),
    rotate by signs2 (int8 [K / b, b]). Then quantize_per_token(., bits) (zero None), with
    asymmetric=True quantize_per_token_asym(., bits) (zero int32 [M, 1]), or with static_scale
    (float32 [K], of the transformed channels) quantize_per_channel(., static_scale, bits).
    out: preallocated (q, scale) or, asymmetric, (q, scale, zero) to write into (tests poison them).
    """
    if bits not in (4, 8):
        raise ValueError(f"transform_quantize_rows: bits must be 4 or 8, got {bits}.")
    if x.dim() != 2 or not x.is_floating_point() or x.shape[1] == 0:
        raise ValueError(
            f"transform_quantize_rows: x must be a float [M, K] tensor with K > 0, got {x.dtype} {tuple(x.shape)}."
        )
    m, k = x.shape
    floats = (torch.float32,)
    _check_step("smooth", smooth, floats, (k,), f"float32 [K]=[{k}]")
    _check_step("perm", perm, (torch.int64,), (k,), f"int64 [K]=[{k}]")
    _check_step("static_scale", static_scale, floats, (k,), f"float32 [K]=[{k}]")
    if static_scale is not None and asymmetric:
        raise ValueError(
            "transform_quantize_rows: static per-channel scales are symmetric; a zero point needs per-token scales."
        )
    signs = signs1 if signs1 is not None else signs2
    b = 1 if signs is None else signs.shape[-1]
    if signs is not None and (b & (b - 1) or k % b or b > _MAX_CHUNK):
        raise ValueError(
            f"transform_quantize_rows: the rotation block b must be a power of two up to {_MAX_CHUNK} that divides "
            f"K={k}, got signs of shape {tuple(signs.shape)}."
        )
    _check_step("signs1", signs1, (torch.int8,), (k // b, b), f"int8 [K / b, b]=[{k // b}, {b}]")
    _check_step("signs2", signs2, (torch.int8,), (k // b, b), f"int8 [K / b, b]=[{k // b}, {b}]")
    x = x if x.stride(1) == 1 else x.contiguous()
    q, scale, zero = rows_out("transform_quantize_rows", x, out, asymmetric)
    steps = [None if t is None else t.contiguous() for t in (smooth, signs1, perm, signs2, static_scale)]
    staged = perm is not None and (smooth is not None or signs1 is not None)
    scratch = torch.empty(m, k, dtype=torch.float32, device=x.device) if staged else x  # any pointer when unused
    present = [t for t in steps if t is not None]
    check_device("transform_quantize_rows", _transform_quantize_kernel, x, q, scale, scratch, *present)
    if m:
        chunk = min(triton.next_power_of_2(k), _MAX_CHUNK)
        width = b if signs is not None else min(chunk, _PLAIN_WIDTH)
        warps = 1 if interpreted(_transform_quantize_kernel) else max(1, min(8, chunk // 512))
        _transform_quantize_kernel[(m,)](
            x, q, scale, scale if zero is None else zero, *[x if t is None else t for t in steps], scratch, k,
            x.stride(0), q.stride(0),
            QMAX=2 ** (bits - 1) - 1, SMOOTH=smooth is not None, ROT1=signs1 is not None, PERM=perm is not None,
            ROT2=signs2 is not None, STAGED=staged, STATIC=static_scale is not None, ASYM=asymmetric,
            CB=chunk // width, B=width,
            LOG_B=width.bit_length() - 1, INV_SQRT_B=1 / math.sqrt(width),
            # No multiply-add fusion: the reference rounds after every float32 operation.
            enable_fp_fusion=False, num_warps=warps,
        )  # fmt: skip
    return q, scale, zero
