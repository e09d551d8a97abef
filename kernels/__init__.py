"""quantvla_kernels: int4 packing, per-token activation quantization and integer GEMMs.

The torch reference here is exact and runs on any device; it is the CPU path and the oracle
the GPU kernels are tested against. quantized_matmul picks the Triton kernels for CUDA tensors
(quantvla_kernels.triton_quant / triton_transform / triton_gemm, imported only then, so triton
stays optional) and the reference otherwise; there it can also run a layer's input transform
fused with the activation quantization (fuses_transform). Nothing here knows about models or ROS.
"""

from .dispatch import fuses_transform, quantized_matmul, uses_triton
from .packing import pack_int4, unpack_int4
from .quantize import quantize_per_channel, quantize_per_token, quantize_per_token_asym
from .reference import code_sums, int_matmul, scaled_int_matmul, w4a4_linear, w4a8_linear, w8a8_linear

__all__ = [
    "code_sums",
    "fuses_transform",
    "int_matmul",
    "pack_int4",
    "quantize_per_channel",
    "quantize_per_token",
    "quantize_per_token_asym",
    "quantized_matmul",
    "scaled_int_matmul",
    "unpack_int4",
    "uses_triton",
    "w4a4_linear",
    "w4a8_linear",
    "w8a8_linear",
]
