"""Activation quantization at run time: dynamic per-token scales, or static per-channel scales.

The quantization itself runs in quantvla_kernels (quantize_per_token, quantize_per_token_asym,
quantize_per_channel, fused into the GEMM path on the GPU); this module holds the settings and
the calibration. Dynamic per-token: one scale per row, which factors out of the integer GEMM as
a row scale of the int32 accumulator. Symmetric (codes ±(2^(b-1) - 1)), or asymmetric as the
paper's App. A specifies: an unsigned 2^b-level grid over the row's range with a zero point per
row, which the GEMM removes exactly as zero_m · Σ_k w_nk (the weight codes' sums are stored with
the layer). A zero point spends no level on the half of a one-sided range that symmetric codes
leave empty (e.g. after a GELU), at the price of that correction in the GEMM's epilogue.

Static per-input-channel scales (what the authors' code calibrates: p99.9 of |x| per channel,
reference/quantvla-paper.md §1 [C]) sit on the K axis, so they cannot factor out of the
int32 sum. They are used exactly by splitting them into a smoothing vector and a per-tensor
scale of 1: the activation is rounded as x / scale_k and scale_k is folded into the weight's
columns before the weight is quantized (SmoothQuant's migration with the activation's whole
range moved). The integer GEMM then runs with a row scale of 1. The honest cost: channels with
large activations become weight columns with large values, which the weight quantizer sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def act_qmax(bits: int) -> int:
    """Activations use the symmetric range ±(2^(bits-1) - 1), as quantize_per_token does."""
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class ActivationQuantizer:
    """How a QuantLinear quantizes its (already transformed) input.

    bits: 4 or 8, or 16 to keep activations in float (weight-only quantization).
    static: use a calibrated per-input-channel scale instead of per-token scales.
    asymmetric: per-token scales with a zero point (per-token integer activations only).
    """

    bits: int = 8
    static: bool = False
    asymmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise ValueError(f"ActivationQuantizer: bits must be 4, 8 or 16 (float), got {self.bits}.")
        if self.static and self.bits == 16:
            raise ValueError("ActivationQuantizer: static scales need 4- or 8-bit activations, not 16 (float).")
        if self.asymmetric and (self.static or self.bits == 16):
            raise ValueError(
                "ActivationQuantizer: a zero point needs dynamic per-token 4- or 8-bit activations "
                "(not static scales, not float activations)."
            )

    @property
    def is_float(self) -> bool:
        return self.bits == 16


def percentile_channel_scales(samples: list[torch.Tensor], bits: int, percentile: float = 99.9) -> torch.Tensor:
    """Static per-channel scales [K]: running max over samples of the per-channel percentile of |x|, / qmax.

    Each sample is one calibration batch [..., K]. A channel that is zero everywhere gets the
    smallest normal scale, so dividing by it yields 0 rather than NaN.
    """
    if bits not in (4, 8):
        raise ValueError(f"percentile_channel_scales: bits must be 4 or 8, got {bits}.")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile_channel_scales: percentile must be in (0, 100], got {percentile}.")
    if not samples:
        raise ValueError("percentile_channel_scales: samples is empty; record at least one calibration batch.")
    k = samples[0].shape[-1]
    running: torch.Tensor | None = None
    for i, x in enumerate(samples):
        if x.dim() == 0 or x.shape[-1] != k or x.numel() == 0:
            raise ValueError(
                f"percentile_channel_scales: sample {i} must be a non-empty [..., {k}] tensor, got {tuple(x.shape)}."
            )
        p = torch.quantile(x.detach().reshape(-1, k).abs().float(), percentile / 100.0, dim=0)
        running = p if running is None else torch.maximum(running, p)
    return (running / act_qmax(bits)).clamp(min=torch.finfo(torch.float32).tiny)
