"""Linears that read one input: q/k/v of an attention, gate/up of an MLP.

Model code projects them together through `project`, so that linears which quantization fused
into one GEMM (quant/fused.py: one input transform, one activation quantization, one GEMM over
their concatenated rows) run as that one GEMM and are split, and plain ones run one by one. A
fused member exposes `fused` (the layer computing all the rows, with `split_sizes`) and `index`
(its place among them); nothing else here knows about quantization.
"""

from __future__ import annotations

import torch
from torch import nn


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each linear applied to x, in order: one GEMM when they are exactly the members of one fused layer."""
    fused = getattr(linears[0], "fused", None)
    members = [getattr(linear, "fused", None) is fused and getattr(linear, "index", None) for linear in linears]
    if fused is not None and members == list(range(len(fused.split_sizes))):
        return tuple(fused(x).split(fused.split_sizes, dim=-1))
    return tuple(linear(x) for linear in linears)
