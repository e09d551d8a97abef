"""Qwen3 decoder as GR00T N1.5's Eagle backbone uses it: causal self-attention with grouped KV
heads and a per-head RMSNorm on queries and keys, SwiGLU MLP, no biases.

Module names follow HF `Qwen3ForCausalLM` (`model.embed_tokens`, `model.layers.{i}`, `model.norm`);
the LM head is not built because GR00T only reads hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_ros.models.common.attention import apply_rope, attention_bias, rope_cos_sin
from quantvla_ros.models.common.llama import RMSNorm, SwiGLUMLP
from quantvla_ros.models.common.projection import project


@dataclass(frozen=True)
class Qwen3Config:
    width: int = 2048
    depth: int = 12  # GR00T keeps the first `select_layer` of Qwen3-1.7B's 28 layers
    mlp_dim: int = 6144
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 151_936
    rope_theta: float = 1_000_000.0
    eps: float = 1e-6


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        # The q/k norms act on each head's vector before RoPE, as in HF Qwen3.
        q, k, v = project(h, self.q_proj, self.k_proj, self.v_proj)
        q = self.q_norm(q.view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = SwiGLUMLP(cfg.width, cfg.mlp_dim)
        self.input_layernorm = RMSNorm(cfg.width, cfg.eps)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.eps)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """embeds [B, T, width] with left padding marked False in mask [B, T] -> final-norm hidden states.

        Positions count valid tokens only, so a left-padded prompt gets the positions it would
        have unpadded; a padding query sees nothing and yields a finite average that callers mask.
        """
        positions = (torch.cumsum(mask.long(), dim=1) - 1).clamp(min=0)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        t = mask.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
        bias = attention_bias(causal[None] & mask[:, None, :], embeds.dtype)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        return self.norm(x)


class Qwen3LanguageModel(nn.Module):
    """`language_model.model.*` in the checkpoint (HF's CausalLM nesting, without its head)."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.model = Qwen3Model(cfg)
