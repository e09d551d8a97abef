"""Gemma decoder layers as π0 uses them: split into the halves around attention.

π0's action expert attends to the LLM's cached keys and values as well as its own, so the
caller runs attention between a layer's `project_qkv` and `finish` (writing K/V into a cache in
between) rather than the layer running a single forward. π0.5's expert norms are adaptive: they
take a modulation (scale, shift, gate) that depends on the timestep only and is computed once
per timestep by `AdaRMSNorm.modulation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_ros.models.common.projection import project


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    eps: float = 1e-6


class RMSNorm(nn.Module):
    """Gemma RMSNorm, `x * rsqrt(mean(x²) + eps) * (1 + w)`, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, modulation: None = None) -> tuple[torch.Tensor, None]:
        """The norm of x, and no residual gate (the modulation slot is for AdaRMSNorm's signature)."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype), None


class AdaRMSNorm(nn.Module):
    """π0.5's adaptive RMSNorm: the time condition gives (scale, shift, gate) per channel."""

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """The time condition [N, cond_dim] -> [N, 3 * dim], (scale, shift, gate) side by side."""
        return self.dense(cond.to(self.dense.weight.dtype))

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm of x [B, T, dim] under a modulation() output ([B or 1, 3 * dim]), and the residual gate."""
        scale, shift, gate = modulation[:, None, :].chunk(3, dim=-1)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed h [B, T, width] -> q [B, H, T, d], k/v [B, Hkv, T, d], before RoPE."""
        b, t, _ = h.shape
        q, k, v = project(h, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, adarms_cond_dim: int | None) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(cfg)
        self.mlp = GemmaMLP(cfg)
        if adarms_cond_dim is None:
            self.input_layernorm: RMSNorm | AdaRMSNorm = RMSNorm(cfg.width, cfg.eps)
            self.post_attention_layernorm: RMSNorm | AdaRMSNorm = RMSNorm(cfg.width, cfg.eps)
        else:
            self.input_layernorm = AdaRMSNorm(cfg.width, adarms_cond_dim, cfg.eps)
            self.post_attention_layernorm = AdaRMSNorm(cfg.width, adarms_cond_dim, cfg.eps)

    def project_qkv(
        self, x: torch.Tensor, modulation: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pre-attention half: q [B, H, T, d], k/v [B, Hkv, T, d] before RoPE, and the residual gate.

        `modulation` is the input norm's (π0.5's expert), None for a plain RMSNorm."""
        h, gate = self.input_layernorm(x, modulation)
        return *self.self_attn.project(h), gate

    def finish(
        self,
        x: torch.Tensor,
        attn_out: torch.Tensor,
        gate: torch.Tensor | None,
        modulation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Post-attention half: output projection, residual, MLP, residual (`modulation`: the post-attention norm's)."""
        x = gated_residual(x, self.self_attn.o_proj(attn_out.to(x.dtype)), gate)
        h, gate = self.post_attention_layernorm(x, modulation)
        return gated_residual(x, self.mlp(h), gate)


class GemmaModel(nn.Module):
    """A Gemma stack; the action expert has no token embedding of its own."""

    def __init__(self, cfg: GemmaConfig, vocab_size: int | None, adarms_cond_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if vocab_size is not None:
            self.embed_tokens = nn.Embedding(vocab_size, cfg.width)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, adarms_cond_dim) for _ in range(cfg.depth))
        self.norm: RMSNorm | AdaRMSNorm = (
            RMSNorm(cfg.width, cfg.eps) if adarms_cond_dim is None else AdaRMSNorm(cfg.width, adarms_cond_dim, cfg.eps)
        )
