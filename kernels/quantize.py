"""Activation quantization: the codes, scales and zero points every integer GEMM here consumes.

Per token, symmetric (quantize_per_token) or asymmetric with a zero point (quantize_per_token_asym,
QuantVLA's App. A), or with calibrated static per-channel scales (quantize_per_channel).
"""

import torch


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of x over its last axis, symmetrically, to `bits` in {4, 8}.

    Returns q (int8, same shape as x) and scale (float32, [..., 1]) with x ≈ q * scale,
    scale = amax / qmax and q = round_half_to_even(x / scale) clamped to [-qmax, qmax].

    Activations use the symmetric range -127..127 (-7..7 for 4 bits) so that negating an
    activation never overflows; weights use the full signed range -128..127 (-8..7), which
    their own quantizer chooses offline where the extra level buys precision.
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize_per_token: bits must be 4 or 8, got {bits}.")
    if not x.is_floating_point():
        raise TypeError(f"quantize_per_token: x must be a floating point tensor, got {x.dtype}.")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize_per_token: x needs a non-empty last dimension, got shape {tuple(x.shape)}.")
    qmax = 2 ** (bits - 1) - 1
    # float32 whatever the input dtype, so bf16/fp16 callers get the same scales as float32 ones.
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    # A zero row gets the smallest normal scale instead of 0, so x / scale is 0 rather than NaN.
    scale = (amax / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(x / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def quantize_per_channel(x: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] with calibrated per-channel scales [K]: q = round_half_to_even(x / scale) clamped.

    Returns q (int8) and a row scale of ones (float32, [..., 1]): the channel scales cannot factor
    out of an integer sum over K, so their owner folds them into the weight's columns instead
    (quantvla_ros.quant.activations explains how). Same rounding as quantize_per_token.
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize_per_channel: bits must be 4 or 8, got {bits}.")
    if not x.is_floating_point():
        raise TypeError(f"quantize_per_channel: x must be a floating point tensor, got {x.dtype}.")
    if x.dim() == 0 or scale.shape != (x.shape[-1],):
        raise ValueError(
            f"quantize_per_channel: scale must be [K] for x [..., K], got {tuple(scale.shape)} for {tuple(x.shape)}."
        )
    qmax = 2 ** (bits - 1) - 1
    q = torch.round(x.float() / scale.float()).clamp(-qmax, qmax).to(torch.int8)
    return q, torch.ones(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)


def quantize_per_token_asym(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of x over its last axis onto an unsigned `bits` grid with a zero point.

    QuantVLA's App. A: x̃ = clip(round(x / Δ) + z, 0, 2^bits - 1) and x ≈ Δ (x̃ - z), per token,
    with the row's range widened to include 0 (so 0 is exact): lo = min(min x, 0), hi = max(max x, 0),
    Δ = (hi - lo) / (2^bits - 1), z = round(-lo / Δ). The codes and zero points are returned shifted
    by -2^(bits-1) into the signed range the int8 GEMMs read (-128..127, or -8..7 for 4 bits):
    x ≈ Δ (q - zero) still holds. Returns q (int8, shape of x), Δ (float32 [..., 1]) and zero
    (int32 [..., 1]). Rounding is half to even, in float32 whatever the input dtype.
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize_per_token_asym: bits must be 4 or 8, got {bits}.")
    if not x.is_floating_point():
        raise TypeError(f"quantize_per_token_asym: x must be a floating point tensor, got {x.dtype}.")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize_per_token_asym: x needs a non-empty last dimension, got shape {tuple(x.shape)}.")
    levels, shift = 2**bits - 1, 2 ** (bits - 1)
    x = x.float()
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0.0)
    # A zero row gets the smallest normal step instead of 0, so x / step is 0 rather than NaN.
    step = ((hi - lo) / levels).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / step)
    q = (torch.round(x / step) + zero).clamp(0, levels) - shift
    return q.to(torch.int8), step, (zero - shift).to(torch.int32)
