"""Exact integer GEMMs in plain torch: the CPU path, and the oracle the GPU kernels must match.

Weights are [N, K] like nn.Linear.weight; activations are [M, K] and quantized per token,
symmetrically, or asymmetrically with a zero point per token (then each group's integer sum is
corrected by the zero point times the weight codes' sum over that group, precomputed offline).
"""

import functools

import torch

from .packing import unpack_int4
from .quantize import quantize_per_token, quantize_per_token_asym

# int32 accumulation holds K products of magnitude up to 128 * 128 = 2**14 only while K < 2**17.
_MAX_K = 2**17 - 1
# K products of int8 codes (each at most 128 * 128 = 2**14 in magnitude) sum exactly in float32
# while K * 2**14 <= 2**24.
_FP32_EXACT_K = 1024
# With a zero point, a product (q - zero) * w reaches 255 * 128: the corrected sum fits int32 while
# K < 2**31 / (255 * 128), i.e. K <= 65792 (int32 wraps in between but the true value fits).
_MAX_K_ASYM = 2**16 - 1


def check_zero_point(
    fn: str, a_zero: torch.Tensor | None, w_sum: torch.Tensor | None, m: int, w_scale_shape: tuple, k: int
) -> None:
    """A zero point's operands, as every asymmetric GEMM takes them: both or neither, int32, shaped."""
    if (a_zero is None) != (w_sum is None):
        raise ValueError(f"{fn}: a_zero and w_sum come together (asymmetric activations) or not at all.")
    if a_zero is None:
        return
    if a_zero.dtype != torch.int32 or a_zero.shape != (m, 1):
        raise ValueError(f"{fn}: a_zero must be int32 [{m}, 1], got {a_zero.dtype} {tuple(a_zero.shape)}.")
    if w_sum.dtype != torch.int32 or w_sum.shape != tuple(w_scale_shape):
        raise ValueError(f"{fn}: w_sum must be int32 {list(w_scale_shape)}, got {w_sum.dtype} {tuple(w_sum.shape)}.")
    if k > _MAX_K_ASYM:
        raise ValueError(f"{fn}: with a zero point K must be at most {_MAX_K_ASYM}, got {k}.")


def code_sums(w_q: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Sum of the weight codes w_q int8 [N, K] per output channel (int32 [N]) or per group along K
    (int32 [N, K // group_size]): what a zero point multiplies in an asymmetric GEMM."""
    n, k = w_q.shape
    if group_size is None:
        return w_q.sum(dim=1, dtype=torch.int32)
    return w_q.reshape(n, k // group_size, group_size).sum(dim=2, dtype=torch.int32)


def _check_operands(fn: str, a_q: torch.Tensor, w_q: torch.Tensor) -> tuple[int, int, int]:
    for name, t in (("a_q", a_q), ("w_q", w_q)):
        if t.dtype != torch.int8:
            raise TypeError(f"{fn}: {name} must be int8, got {t.dtype}.")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {tuple(t.shape)}.")
    (m, k), (n, k_w) = a_q.shape, w_q.shape
    if k != k_w:
        raise ValueError(f"{fn}: a_q [M, K] and w_q [N, K] disagree on K ({k} vs {k_w}).")
    if k > _MAX_K:
        raise ValueError(f"{fn}: K={k} could overflow the int32 accumulator, so K must be at most {_MAX_K}.")
    return m, k, n


def _int_mm_fits(m: int, k: int, n: int) -> bool:
    # CUDA's torch._int_mm needs M > 16 and K, N nonzero multiples of 8; torch 2.13 on CPU takes
    # any shape. Applying CUDA's rule everywhere lets CPU tests cover both branches, and both
    # branches are exact, so the device never changes a result.
    return m > 16 and k > 0 and n > 0 and k % 8 == 0 and n % 8 == 0


def int_matmul(a_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact a_q @ w_q.T for int8 a_q [M, K] and w_q [N, K], as int32 [M, N]."""
    m, k, n = _check_operands("int_matmul", a_q, w_q)
    if _int_mm_fits(m, k, n):
        # The transpose of a contiguous [N, K] weight is the column-major B that cuBLAS runs
        # about 7x faster than a row-major one (reference/kernels-anchors.md).
        return torch._int_mm(a_q.contiguous(), w_q.contiguous().t())
    # float32 GEMMs on the codes, over slices of K in which every partial sum, in any order, is an
    # integer of magnitude at most 2**24 and so exact; the slices add in int32.
    parts = [
        (a_q[:, k0 : k0 + _FP32_EXACT_K].float() @ w_q[:, k0 : k0 + _FP32_EXACT_K].float().t()).to(torch.int32)
        for k0 in range(0, k, _FP32_EXACT_K)
    ]
    return functools.reduce(torch.add, parts) if parts else torch.zeros(m, n, dtype=torch.int32, device=a_q.device)


def scaled_int_matmul(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    a_zero: torch.Tensor | None = None,
    w_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantizing int8 GEMM: ((a_q - a_zero) * a_scale) @ (w_q * w_scale).T + bias, as [M, N] out_dtype.

    w_scale is [N] per output channel (group_size None) or [N, K // group_size] per group along K.
    a_zero (int32 [M, 1], asymmetric activations) comes with w_sum = code_sums(w_q, group_size).
    The epilogue, in float32: acc_w = sum over groups, in order, of exact_int_g * w_scale_g (one
    group when per channel), exact_int_g = int32 sum over the group of a_q * w_q, minus a_zero *
    w_sum_g; y = acc_w * a_scale + bias. Group scales cannot be folded into one int32 accumulator,
    so each group's exact partial sum is scaled on its own.
    """
    m, k, n = _check_operands("scaled_int_matmul", a_q, w_q)
    if not a_scale.is_floating_point() or a_scale.shape != (m, 1):
        raise ValueError(
            f"scaled_int_matmul: a_scale must be a float tensor of shape ({m}, 1), "
            f"got {a_scale.dtype} {tuple(a_scale.shape)}."
        )
    if group_size is None:
        groups = 1
        w_scale_shape: tuple[int, ...] = (n,)
    else:
        if group_size <= 0 or k % group_size:
            raise ValueError(f"scaled_int_matmul: group_size must be a positive divisor of K={k}, got {group_size}.")
        groups = k // group_size
        w_scale_shape = (n, groups)
    if not w_scale.is_floating_point() or w_scale.shape != w_scale_shape:
        raise ValueError(
            f"scaled_int_matmul: w_scale must be a float tensor of shape {w_scale_shape}, "
            f"got {w_scale.dtype} {tuple(w_scale.shape)}."
        )
    if bias is not None and (not bias.is_floating_point() or bias.shape != (n,)):
        raise ValueError(
            f"scaled_int_matmul: bias must be a float tensor of shape ({n},), got {bias.dtype} {tuple(bias.shape)}."
        )
    check_zero_point("scaled_int_matmul", a_zero, w_sum, m, w_scale_shape, k)

    w_scale = w_scale.float().reshape(n, groups)
    size = group_size or k
    acc = None
    for g in range(groups):
        part = int_matmul(a_q[:, g * size : (g + 1) * size], w_q[:, g * size : (g + 1) * size])
        if a_zero is not None:
            part = part - a_zero * w_sum.reshape(n, groups)[:, g]
        term = part.float() * w_scale[:, g]
        # Group sums in order from the first; adding to a zero first would change only its sign.
        acc = term if acc is None else acc + term
    y = acc * a_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _quantized_linear(
    fn: str,
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int | None,
    bias: torch.Tensor | None,
    act_bits: int,
    asymmetric: bool,
) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] != w_q.shape[-1]:
        raise ValueError(
            f"{fn}: x must be [..., K] with K={w_q.shape[-1]} to match the weight, got shape {tuple(x.shape)}."
        )
    rows = x.reshape(-1, x.shape[-1])
    if asymmetric:
        a_q, a_scale, a_zero = quantize_per_token_asym(rows, act_bits)
        w_sum = code_sums(w_q, group_size)
    else:
        (a_q, a_scale), a_zero, w_sum = quantize_per_token(rows, act_bits), None, None
    y = scaled_int_matmul(a_q, a_scale, w_q, w_scale, group_size, bias, x.dtype, a_zero, w_sum)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


def w8a8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    asymmetric: bool = False,
) -> torch.Tensor:
    """y [..., N] = x [..., K] through int8 weights w_q [N, K], with x quantized to int8 per token
    (asymmetric: with a zero point per token)."""
    return _quantized_linear("w8a8_linear", x, w_q, w_scale, group_size, bias, 8, asymmetric)


def w4a8_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    k: int,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    act_bits: int = 8,
    asymmetric: bool = False,
) -> torch.Tensor:
    """y [..., N] = x [..., K] through int4 weights packed as uint8 [N, K // 2] by pack_int4.

    x is quantized per token to act_bits (8, or 4 for W4A4), with a zero point when asymmetric.
    """
    if act_bits not in (4, 8):
        raise ValueError(f"w4a8_linear: act_bits must be 4 or 8, got {act_bits}.")
    w_q = unpack_int4(packed_w, k)
    return _quantized_linear("w4a8_linear", x, w_q, w_scale, group_size, bias, act_bits, asymmetric)


def w4a4_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    k: int,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    asymmetric: bool = False,
) -> torch.Tensor:
    """w4a8_linear with x quantized to int4 per token (-7..7, or 16 levels with a zero point)."""
    return w4a8_linear(x, packed_w, w_scale, k, group_size, bias, act_bits=4, asymmetric=asymmetric)
