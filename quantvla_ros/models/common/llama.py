"""The pieces Llama-style decoders share: Qwen3 (GR00T N1.5's backbone) and SmolLM2 (SmolVLA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_ros.models.common.projection import project


class RMSNorm(nn.Module):
    """`w * x * rsqrt(mean(x²) + eps)` in fp32 (Llama scales by w, not by 1 + w as Gemma does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


class SwiGLUMLP(nn.Module):
    """`down(silu(gate(x)) * up(x))`, no biases."""

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)
