"""Attention pieces every family shares: big_vision's attention masks, additive biases, RoPE, SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, T, head_dim] in fp32 (HF's half-split rotary layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """q [B, H, Tq, d], k/v [B, Hkv, Tk, d], allowed bool [B, Tq, Tk] -> [B, Tq, H*d].

    The mask is additive with the dtype's most negative value, so a query row that may see
    nothing (a padding token) gives a finite uniform average instead of NaN.
    """
    return attend(q, k, v, attention_bias(allowed, q.dtype))


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask [B, Tq, Tk] -> additive bias [B, 1, Tq, Tk], built once where many layers share it."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """attention() with its bias already built by attention_bias()."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=k.shape[1] != q.shape[1])
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


def make_att_2d_masks(pad_masks: torch.Tensor, ar_masks: torch.Tensor) -> torch.Tensor:
    """big_vision's rule: a token sees every valid token whose cumulative AR count is ≤ its own."""
    cumsum = torch.cumsum(ar_masks.to(torch.int32), dim=1)
    allowed = cumsum[:, None, :] <= cumsum[:, :, None]
    return allowed & (pad_masks[:, None, :] & pad_masks[:, :, None])
