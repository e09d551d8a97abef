"""Dynamic per-token activation quantization: the scales every integer GEMM here consumes."""

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
