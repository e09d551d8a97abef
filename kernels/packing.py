"""Two int4 values per byte along K, the layout the GPU kernels read from [N, K] weights."""

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] of shape [..., K] into uint8 [..., K // 2].

    Element 2j goes to the low nibble and 2j + 1 to the high nibble, as two's complement.
    Packing along K keeps K contiguous, which the measured GEMMs need (reference/kernels.md);
    int4 activations use the same layout.
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4: q must be int8, got {q.dtype}.")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4: q's last dimension must be even, got shape {tuple(q.shape)}.")
    # Runs offline on weights, so the device sync of this check is affordable.
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: q has values outside the int4 range [-8, 7].")
    # A bitcast keeps the two's complement bits on every device; a dtype cast of negatives need not.
    nibbles = q.view(torch.uint8) & 0x0F
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., k // 2] -> int8 [..., k] with values in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4: packed must be uint8, got {packed.dtype}.")
    if packed.dim() == 0 or k != 2 * packed.shape[-1]:
        raise ValueError(
            f"unpack_int4: k must be twice packed's last dimension, got k={k} for shape {tuple(packed.shape)}."
        )
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    # Sign-extend a nibble n in 0..15 as (n ^ 8) - 8, which avoids shifting a signed byte.
    signed = (nibbles ^ 8).view(torch.int8) - 8
    return signed.reshape(*packed.shape[:-1], k)
