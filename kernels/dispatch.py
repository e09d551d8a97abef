"""One entry point for a quantized linear layer: Triton kernels on CUDA, the exact reference elsewhere.

Both paths compute the same thing (reference.scaled_int_matmul's semantics); the Triton one
differs only by float32 rounding in the epilogue. On the Triton path the layer's input transform
(smoothing, Hadamard-sign rotations, permutation) can run fused with the activation quantization
(triton_transform), so a layer is two launches: at M ≈ 50 the ~20 small torch kernels of each
rotation would otherwise cost more than the GEMM.
"""

import functools
import warnings
from types import ModuleType
from typing import Protocol

import torch

from .packing import unpack_int4
from .quantize import quantize_per_channel, quantize_per_token, quantize_per_token_asym
from .reference import scaled_int_matmul


class QuantizedLayer(Protocol):
    """What quantized_matmul reads from a layer (QuantLinear's buffers and settings)."""

    weight_packed: torch.Tensor  # int8 [N, K], or uint8 [N, K / 2] from pack_int4 when w_bits == 4
    weight_scale: torch.Tensor  # float32 [N], or [N, K / group_size]
    bias: torch.Tensor | None  # float [N]
    input_scale: torch.Tensor | None  # float32 [K] static activation scales, or None for per-token
    # int32 code sums (reference.code_sums, shaped as weight_scale) when activations are quantized
    # per token with a zero point; None when they are symmetric.
    weight_sum: torch.Tensor | None
    in_features: int
    w_bits: int  # 4 or 8
    a_bits: int  # 4 or 8
    group_size: int | None
    # The input transform's steps, read only with fuse_transform=True; a layer may lack any of them.
    input_smooth: torch.Tensor  # float32 [K]
    input_rotation1_signs: torch.Tensor  # int8 [K / b, b] of ±1
    input_perm: torch.Tensor  # int64 [K]
    input_rotation2_signs: torch.Tensor  # int8 [K / b, b]
    input_rotation1: torch.Tensor  # dense float32 [K / b, b, b]: not fused
    input_rotation2: torch.Tensor


# triton_transform.transform_quantize_rows' arguments, in its order.
_FUSED_STEPS = ("smooth", "rotation1_signs", "perm", "rotation2_signs")


@functools.cache
def _triton_modules() -> tuple[ModuleType, ModuleType, ModuleType] | None:
    # Imported on first CUDA use only: CPU machines (and robots without triton) never need it.
    try:
        from . import triton_gemm, triton_quant, triton_transform
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        warnings.warn(f"{e} CUDA layers use the exact reference GEMM instead.", stacklevel=3)
        return None
    return triton_quant, triton_transform, triton_gemm


def _triton_supports(layer: QuantizedLayer) -> bool:
    g = layer.group_size
    return g is None or (g >= 32 and g & (g - 1) == 0)


def uses_triton(x: torch.Tensor, layer: QuantizedLayer) -> bool:
    """Whether quantized_matmul(x, layer, ...) runs the Triton kernels (fixed per device and layer)."""
    return x.is_cuda and _triton_supports(layer) and _triton_modules() is not None


def fuses_transform(x: torch.Tensor, layer: QuantizedLayer) -> bool:
    """Whether quantized_matmul(x, layer, out_dtype, fuse_transform=True) can run.

    It needs the Triton path, integer activations and no dense rotation blocks: smoothing,
    Hadamard-sign rotations and a permutation fuse, the "svd" option's dense blocks do not.
    """
    if layer.a_bits not in (4, 8) or not uses_triton(x, layer):
        return False
    return getattr(layer, "input_rotation1", None) is None and getattr(layer, "input_rotation2", None) is None


def quantized_matmul(
    x: torch.Tensor, layer: QuantizedLayer, out_dtype: torch.dtype, fuse_transform: bool = False
) -> torch.Tensor:
    """x float [M, K] -> quantize activations -> integer GEMM -> [M, N] out_dtype.

    Activations are quantized per token, symmetrically or with a zero point (layer.weight_sum set),
    or with the layer's static per-channel scales.

    CUDA tensors go through the Triton kernels (when triton is installed and the layer's
    group_size is a power of two >= 32); everything else through the exact reference.
    fuse_transform: x is the layer's input before its transform (input_smooth, input_rotation1_signs,
    input_perm, input_rotation2_signs, those it has), which runs fused with the quantization; only
    where fuses_transform(x, layer) says so.
    """
    if layer.a_bits not in (4, 8) or layer.w_bits not in (4, 8):
        raise ValueError(
            f"quantized_matmul: needs 4- or 8-bit weights and activations, got W{layer.w_bits}A{layer.a_bits}; "
            "float activations (a_bits=16) stay on the caller's float path."
        )
    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"quantized_matmul: x must be [M, {layer.in_features}], got shape {tuple(x.shape)}.")
    if fuse_transform and not fuses_transform(x, layer):
        raise ValueError(
            "quantized_matmul: fuse_transform=True needs the Triton path and no dense rotations "
            "(see fuses_transform); apply the layer's input transform to x first instead."
        )
    if uses_triton(x, layer):
        return _triton_matmul(x, layer, out_dtype, fuse_transform)
    a_zero = None
    if layer.input_scale is not None:
        a_q, a_scale = quantize_per_channel(x, layer.input_scale, layer.a_bits)
    elif layer.weight_sum is not None:
        a_q, a_scale, a_zero = quantize_per_token_asym(x, layer.a_bits)
    else:
        a_q, a_scale = quantize_per_token(x, layer.a_bits)
    w_q = unpack_int4(layer.weight_packed, layer.in_features) if layer.w_bits == 4 else layer.weight_packed
    return scaled_int_matmul(
        a_q, a_scale, w_q, layer.weight_scale, layer.group_size, layer.bias, out_dtype, a_zero, layer.weight_sum
    )


def _triton_matmul(
    x: torch.Tensor, layer: QuantizedLayer, out_dtype: torch.dtype, fuse_transform: bool = False
) -> torch.Tensor:
    modules = _triton_modules()
    if modules is None:
        raise ModuleNotFoundError("quantized_matmul: the Triton path needs triton, which is not installed.")
    triton_quant, triton_transform, triton_gemm = modules
    steps = [getattr(layer, f"input_{n}", None) for n in _FUSED_STEPS] if fuse_transform else []
    asymmetric = layer.weight_sum is not None
    if any(t is not None for t in steps):
        a_q, a_scale, a_zero = triton_transform.transform_quantize_rows(
            x, layer.a_bits, *steps, layer.input_scale, asymmetric=asymmetric
        )
    else:
        a_q, a_scale, a_zero = triton_quant.quantize_rows(x, layer.a_bits, layer.input_scale, asymmetric=asymmetric)
    return triton_gemm.scaled_int_gemm(
        a_q, a_scale, layer.weight_packed, layer.weight_scale, layer.w_bits, layer.group_size, layer.bias, out_dtype,
        a_zero=a_zero, w_sum=layer.weight_sum,
    )  # fmt: skip
