"""Exact integer GEMMs in plain torch: the CPU path, and the oracle the GPU kernels must match.

Weights are [N, K] like nn.Linear.weight; activations are [M, K] and quantized per token.
"""

import torch

from .packing import unpack_int4
from .quantize import quantize_per_token

# int32 accumulation holds K products of magnitude up to 128 * 128 = 2**14 only while K < 2**17.
_MAX_K = 2**17 - 1


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
    # float64 is exact here: every partial sum, in any order, is an integer below 2**31 < 2**53.
    return (a_q.double() @ w_q.double().t()).to(torch.int32)


def scaled_int_matmul(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantizing int8 GEMM: (a_q * a_scale) @ (w_q * w_scale).T + bias, as [M, N] out_dtype.

    w_scale is [N] per output channel (group_size None) or [N, K // group_size] per group along K.
    The epilogue, in float32: acc_w = sum over groups, in order, of int32_partial_g * w_scale_g
    (one group when per channel); y = acc_w * a_scale + bias. Group scales cannot be folded into
    one int32 accumulator, so each group's exact partial sum is scaled on its own.
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

    w_scale = w_scale.float().reshape(n, groups)
    size = group_size or k
    acc = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    for g in range(groups):
        part = int_matmul(a_q[:, g * size : (g + 1) * size], w_q[:, g * size : (g + 1) * size])
        acc += part.float() * w_scale[:, g]
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
) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] != w_q.shape[-1]:
        raise ValueError(
            f"{fn}: x must be [..., K] with K={w_q.shape[-1]} to match the weight, got shape {tuple(x.shape)}."
        )
    a_q, a_scale = quantize_per_token(x.reshape(-1, x.shape[-1]), act_bits)
    y = scaled_int_matmul(a_q, a_scale, w_q, w_scale, group_size, bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


def w8a8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] through int8 weights w_q [N, K], with x quantized to int8 per token."""
    return _quantized_linear("w8a8_linear", x, w_q, w_scale, group_size, bias, act_bits=8)


def w4a8_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    k: int,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    act_bits: int = 8,
) -> torch.Tensor:
    """y [..., N] = x [..., K] through int4 weights packed as uint8 [N, K // 2] by pack_int4.

    x is quantized per token to act_bits (8, or 4 for W4A4).
    """
    if act_bits not in (4, 8):
        raise ValueError(f"w4a8_linear: act_bits must be 4 or 8, got {act_bits}.")
    w_q = unpack_int4(packed_w, k)
    return _quantized_linear("w4a8_linear", x, w_q, w_scale, group_size, bias, act_bits)


def w4a4_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    k: int,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """w4a8_linear with x quantized to int4 (-7..7) per token."""
    return w4a8_linear(x, packed_w, w_scale, k, group_size, bias, act_bits=4)
