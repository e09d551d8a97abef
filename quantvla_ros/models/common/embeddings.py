"""Sinusoidal time embeddings and the π0-style action-time MLP (π0 and SmolVLA).

The action-time MLP reads [action embedding ; time embedding] through `action_time_mlp_in`. Its
time half depends only on the timestep, so `action_time_constant` computes it (with the bias)
once per timestep and `action_time_tokens` adds it to the action half at every step. A quantized
`action_time_mlp_in` (a custom layout may select it) scales each fused row as a whole and
cannot be split exactly: then the constant is the time embedding itself and the layer runs whole.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """[sin, cos] of 2πt/period over log-spaced periods, computed in float64 as openpi does."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * t.to(torch.float64)[:, None]
    return torch.cat([angle.sin(), angle.cos()], dim=1).to(torch.float32)


def splits_time(mlp_in: nn.Module) -> bool:
    return type(mlp_in) is nn.Linear


def action_time_constant(mlp_in: nn.Module, time_emb: torch.Tensor) -> torch.Tensor:
    """[N, width]: the time half of `mlp_in` (with its bias) over time embeddings [N, width], or the
    embeddings themselves when `mlp_in` cannot be split."""
    if not splits_time(mlp_in):
        return time_emb
    width = time_emb.shape[-1]
    return F.linear(time_emb, mlp_in.weight[:, width:], mlp_in.bias)


def action_time_tokens(
    mlp_in: nn.Module, mlp_out: nn.Module, action_emb: torch.Tensor, time: torch.Tensor
) -> torch.Tensor:
    """mlp_out(silu(mlp_in([action_emb ; time embedding]))) for action_emb [B, H, width] and an
    `action_time_constant` row [B or 1, width]."""
    width = action_emb.shape[-1]
    if splits_time(mlp_in):
        fused = F.linear(action_emb, mlp_in.weight[:, :width]) + time[:, None, :]
    else:
        fused = mlp_in(torch.cat([action_emb, time[:, None, :].expand_as(action_emb)], dim=2))
    return mlp_out(F.silu(fused))
