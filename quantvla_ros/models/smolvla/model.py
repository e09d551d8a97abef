"""SmolVLA: SmolVLM2 prefix (SigLIP + pixel shuffle + SmolLM2) + a narrower SmolLM2 action expert.

Module names reproduce LeRobot's `VLAFlowMatching`, so `state_dict()` of this model is the
checkpoint minus LeRobot's `model.` policy prefix, which `smolvla_checkpoint.py` removes and adds
(as π0 does). The text model has no final norm and no LM head: inference only reads its K/V.

The prefix is `[images | prompt | state token]`; images and prompt attend bidirectionally, the
state token sees them all and nothing in the prefix sees it. Inference runs the prefix once
through the (cut-down) text model and keeps each layer's post-RoPE K/V. Each Euler step then
runs only the expert over the action tokens (causal among themselves):
  * self-attention layers attend to [cached prefix K/V ; their own K/V], positions continuing
    after the prefix;
  * cross-attention layers attend to the cached prefix K/V re-projected by the expert's own
    k_proj/v_proj, queries at positions restarting from 0.
The re-projection does not depend on the step, so it runs once per inference; nothing is ever
appended to the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_ros.models.common.attention import apply_rope, attention, make_att_2d_masks, rope_cos_sin
from quantvla_ros.models.common.llama import RMSNorm, SwiGLUMLP
from quantvla_ros.models.common.siglip import SiglipVisionTransformer
from quantvla_ros.models.family import (
    AttentionObserver,
    AttentionSite,
    attention_linears,
    decoder_linears,
    mlp_linears,
)
from quantvla_ros.models.pi0.model import sincos_time_embedding
from quantvla_ros.models.smolvla.config import SmolLMConfig, SmolVLAConfig

# LeRobot's own apply_rope (half-split layout, same as HF) with max_wavelength 1e4; the rope_theta
# of SmolVLM2's text config is never read by SmolVLA.
ROPE_THETA = 10_000.0

KVCache = list[tuple[torch.Tensor, torch.Tensor]]

# Kept in fp32 inside a bf16 model, as openpi does for π0: the patch/position embeddings and
# every RMSNorm; the small state/action/time projections outside the backbone stay fp32 too.
FP32_PARAMETERS = (
    "embeddings.patch_embedding",
    "embeddings.position_embedding",
    "input_layernorm",
    "post_attention_layernorm",
    "lm_expert.norm",
)


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    if not name.startswith("vlm_with_expert.") or any(s in name for s in FP32_PARAMETERS):
        return torch.float32
    return dtype


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, side², D] patches -> [B, (side/scale)², scale²·D]: each token concatenates a
    scale×scale block of patches, row by row (SmolVLM's connector layout)."""
    b, n, d = x.shape
    side = math.isqrt(n)
    blocks = side // scale
    x = x.view(b, blocks, scale, blocks, scale, d)  # [B, block row, row in block, block col, col in block, D]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, blocks * blocks, scale * scale * d)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, H·d] -> [B, H, T, d]."""
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] -> [B, T, H·d]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class SmolLMAttention(nn.Module):
    """Projections only; `kv_width` is the input width of k/v_proj (a cross-attention layer
    reads the VLM's K/V, Hkv·d wide, instead of its own hidden states)."""

    def __init__(self, cfg: SmolLMConfig, kv_width: int | None = None) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        kv_out = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(kv_width or cfg.width, kv_out, bias=False)
        self.v_proj = nn.Linear(kv_width or cfg.width, kv_out, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)


class SmolLMDecoderLayer(nn.Module):
    """A LLaMA layer split around its attention, which the caller runs (joint, cached or cross)."""

    def __init__(self, cfg: SmolLMConfig, kv_width: int | None = None) -> None:
        super().__init__()
        self.self_attn = SmolLMAttention(cfg, kv_width)
        self.mlp = SwiGLUMLP(cfg.width, cfg.mlp_dim)
        self.input_layernorm = RMSNorm(cfg.width, cfg.eps)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.eps)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        return apply_rope(split_heads(self.self_attn.q_proj(h), self.self_attn.head_dim), cos, sin)

    def query_key_value(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE q [B, H, T, d] and k [B, Hkv, T, d], and v [B, Hkv, T, d], from hidden states."""
        attn = self.self_attn
        h = self.input_layernorm(x)
        q = apply_rope(split_heads(attn.q_proj(h), attn.head_dim), cos, sin)
        k = apply_rope(split_heads(attn.k_proj(h), attn.head_dim), cos, sin)
        return q, k, split_heads(attn.v_proj(h), attn.head_dim)

    def cross_key_value(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert's keys/values for a cross-attention layer: its k/v_proj applied to the VLM's
        post-RoPE K and V, heads flattened head-major as LeRobot does; no RoPE on top."""
        attn = self.self_attn
        keys = split_heads(attn.k_proj(merge_heads(k)), attn.head_dim)
        return keys, split_heads(attn.v_proj(merge_heads(v)), attn.head_dim)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP, residual."""
        x = x + self.self_attn.o_proj(attn_out.to(x.dtype))
        return x + self.mlp(self.post_attention_layernorm(x))


class SmolLMTextModel(nn.Module):
    """SmolVLM's `text_model`, cut to the kept layers; its final norm is never used by SmolVLA."""

    def __init__(self, cfg: SmolLMConfig, vocab_size: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.width)
        self.layers = nn.ModuleList(SmolLMDecoderLayer(cfg) for _ in range(cfg.depth))


class SmolLMExpert(nn.Module):
    """LeRobot's `lm_expert`: no token embedding; cross layers' k/v_proj read the VLM's K/V."""

    def __init__(self, cfg: SmolVLAConfig) -> None:
        super().__init__()
        e, text = cfg.expert, cfg.text
        vlm_kv_width = text.num_kv_heads * text.head_dim
        self.layers = nn.ModuleList(
            SmolLMDecoderLayer(e, vlm_kv_width if cfg.is_cross_layer(i) else None) for i in range(e.depth)
        )
        self.norm = RMSNorm(e.width, e.eps)


class ModalityProjection(nn.Module):
    def __init__(self, in_width: int, out_width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_width, out_width, bias=False)


class SmolVLMConnector(nn.Module):
    def __init__(self, cfg: SmolVLAConfig) -> None:
        super().__init__()
        self.scale_factor = cfg.vlm.scale_factor
        self.modality_projection = ModalityProjection(cfg.vlm.vision.width * self.scale_factor**2, cfg.text.width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.modality_projection.proj(pixel_shuffle(patches, self.scale_factor))


class SmolVLMModel(nn.Module):
    """SmolVLM's vision embeddings bucket patch coordinates for variable-size images; on the full
    square images SmolVLA feeds that gives positions 0..N-1, so plain SigLIP serves."""

    def __init__(self, cfg: SmolVLAConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg.vlm.vision)
        self.connector = SmolVLMConnector(cfg)
        self.text_model = SmolLMTextModel(cfg.text, cfg.vlm.vocab_size)


class SmolVLM(nn.Module):
    """`SmolVLMForConditionalGeneration` without its LM head (never used by SmolVLA)."""

    def __init__(self, cfg: SmolVLAConfig) -> None:
        super().__init__()
        self.model = SmolVLMModel(cfg)


class SmolVLMWithExpert(nn.Module):
    def __init__(self, cfg: SmolVLAConfig) -> None:
        super().__init__()
        self.vlm = SmolVLM(cfg)
        self.lm_expert = SmolLMExpert(cfg)


_LLM = "vlm_with_expert.vlm.model.text_model.layers"
_EXPERT = "vlm_with_expert.lm_expert.layers"


class SmolVLAModel(nn.Module):
    FAMILY = "smolvla"
    LINEAR_GROUPS = {
        "llm": decoder_linears(_LLM),
        "expert_mlp": mlp_linears(_EXPERT),
        "expert_attention": attention_linears(_EXPERT),
    }

    def __init__(self, cfg: SmolVLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = torch.float32
        # Set by calibration; called in every expert layer of every denoising step, site = layer.
        self.attention_observer: AttentionObserver | None = None
        width = cfg.expert.width
        self.vlm_with_expert = SmolVLMWithExpert(cfg)
        self.state_proj = nn.Linear(cfg.max_state_dim, cfg.text.width)
        self.action_in_proj = nn.Linear(cfg.action_dim, width)
        self.action_out_proj = nn.Linear(width, cfg.action_dim)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    @property
    def display_name(self) -> str:
        return "SmolVLA"

    @property
    def vlm(self) -> SmolVLMModel:
        return self.vlm_with_expert.vlm.model

    @property
    def llm(self) -> SmolLMTextModel:
        return self.vlm.text_model

    @property
    def expert(self) -> SmolLMExpert:
        return self.vlm_with_expert.lm_expert

    def attention_sites(self) -> list[AttentionSite]:
        e = self.cfg.expert
        return [
            AttentionSite(f"{_EXPERT}.{i}.self_attn.q_proj", f"{_EXPERT}.{i}.self_attn.o_proj", e.num_heads, e.head_dim)
            for i in range(e.depth)
        ]

    def set_dtype(self, dtype: torch.dtype) -> SmolVLAModel:
        for name, param in self.named_parameters():
            param.data = param.data.to(parameter_dtype(name, dtype))
        self.compute_dtype = dtype
        return self

    def component_parameters(self) -> dict[str, int]:
        """Parameter count per component (works on the meta device)."""

        def count(*modules: nn.Module) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        counts = {
            "vision": count(self.vlm.vision_model, self.vlm.connector),
            "llm": count(self.llm),
            "expert": count(self.expert),
        }
        counts["action_projections"] = count(self) - sum(counts.values())
        return counts

    # ---- embedding ---------------------------------------------------------------------
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, 3, H, W] in [-1, 1] -> tokens [B, C * tokens_per_image, text width]."""
        b, c = images.shape[:2]
        patches = self.vlm.vision_model(images.flatten(0, 1))
        tokens = self.vlm.connector(patches).to(self.compute_dtype)
        return tokens.reshape(b, c * tokens.shape[1], -1)

    def embed_prefix(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix [images | prompt | state]: AR mask 0 except the state token's 1."""
        scale = math.sqrt(self.cfg.text.width)  # LeRobot scales image and text embeddings alike
        img = self.embed_images(images) * scale
        img_pad = image_masks.repeat_interleave(img.shape[1] // images.shape[1], dim=1)
        txt = self.llm.embed_tokens(tokens).to(self.compute_dtype) * scale
        state_token = self.state_proj(state.float())[:, None, :].to(self.compute_dtype)
        embs = torch.cat([img, txt, state_token], dim=1)
        state_pad = torch.ones_like(token_masks[:, :1])
        pad = torch.cat([img_pad, token_masks, state_pad], dim=1)
        ar = torch.zeros_like(pad)
        ar[:, -1] = True
        return embs, pad, ar

    def embed_suffix(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Action tokens with the time fused in (π0-style MLP), causal among themselves."""
        b, horizon, _ = x_t.shape
        width = self.cfg.expert.width
        time_emb = sincos_time_embedding(t, width, self.cfg.min_period, self.cfg.max_period)
        action_emb = self.action_in_proj(x_t.float())
        fused = torch.cat([action_emb, time_emb[:, None, :].expand(b, horizon, width)], dim=2)
        embs = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(fused))).to(self.compute_dtype)
        pad = torch.ones(b, horizon, dtype=torch.bool, device=embs.device)
        return embs, pad, torch.ones_like(pad)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.cfg.text.head_dim, ROPE_THETA)

    # ---- prefix and cache ----------------------------------------------------------------
    def compute_prefix_kv(
        self, prefix_embs: torch.Tensor, prefix_pad: torch.Tensor, prefix_ar: torch.Tensor
    ) -> KVCache:
        """Each text layer's post-RoPE K/V over the prefix (its hidden output is never needed)."""
        cos, sin = self.rope(torch.cumsum(prefix_pad.long(), dim=1) - 1)
        allowed = make_att_2d_masks(prefix_pad, prefix_ar)
        x, kv = prefix_embs, []
        for i, layer in enumerate(self.llm.layers):
            q, k, v = layer.query_key_value(x, cos, sin)
            kv.append((k, v))
            if i + 1 < len(self.llm.layers):  # the last layer's output is never read
                x = layer.finish(x, attention(q, k, v, allowed))
        return kv

    def expert_context(self, prefix_kv: KVCache) -> KVCache:
        """What each expert layer attends to in the prefix: the cache itself for self-attention
        layers, its re-projection by the layer's k/v_proj for cross-attention layers."""
        return [
            layer.cross_key_value(k, v) if self.cfg.is_cross_layer(i) else (k, v)
            for i, (layer, (k, v)) in enumerate(zip(self.expert.layers, prefix_kv, strict=True))
        ]

    # ---- denoising ---------------------------------------------------------------------
    def velocity_cached(
        self, prefix_pad: torch.Tensor, context: KVCache, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """One denoising step's velocity from the expert alone, reading the prefix context."""
        x, suffix_pad, suffix_ar = self.embed_suffix(x_t, t)
        b, s = suffix_pad.shape
        sees_prefix = prefix_pad[:, None, :].expand(b, s, prefix_pad.shape[1])
        self_allowed = torch.cat([sees_prefix, make_att_2d_masks(suffix_pad, suffix_ar)], dim=2)
        steps = torch.cumsum(suffix_pad.long(), dim=1) - 1
        self_rope = self.rope(prefix_pad.sum(dim=1, keepdim=True) + steps)
        cross_rope = self.rope(steps)
        for i, (layer, (ctx_k, ctx_v)) in enumerate(zip(self.expert.layers, context, strict=True)):
            if self.cfg.is_cross_layer(i):
                q, k, v, allowed = layer.query(x, *cross_rope), ctx_k, ctx_v, sees_prefix
            else:
                q, own_k, own_v = layer.query_key_value(x, *self_rope)
                k, v, allowed = torch.cat([ctx_k, own_k], dim=2), torch.cat([ctx_v, own_v], dim=2), self_allowed
            if self.attention_observer is not None:
                self.attention_observer(i, q, k, allowed)
            x = layer.finish(x, attention(q, k, v, allowed))
        return self.action_out_proj(self.expert.norm(x)[:, -self.cfg.action_horizon :].float())

    def velocity_full(
        self, prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The same velocity from one pass over [prefix ; suffix] (LeRobot's training forward):
        self-attention layers attend jointly, cross-attention layers let the prefix attend to
        itself and the expert to the re-projected prefix K/V."""
        prefix_embs, prefix_pad, prefix_ar = prefix
        suffix, suffix_pad, suffix_ar = self.embed_suffix(x_t, t)
        p = prefix_pad.shape[1]
        pad = torch.cat([prefix_pad, suffix_pad], dim=1)
        allowed = make_att_2d_masks(pad, torch.cat([prefix_ar, suffix_ar], dim=1))
        positions = torch.cumsum(pad.long(), dim=1) - 1
        cos, sin = self.rope(positions)
        suffix_positions = positions[:, p:]
        cross_rope = self.rope(suffix_positions - suffix_positions.min(dim=1, keepdim=True).values)
        xp, xs = prefix_embs, suffix
        for i, (vlm_layer, expert_layer) in enumerate(zip(self.llm.layers, self.expert.layers, strict=True)):
            qp, kp, vp = vlm_layer.query_key_value(xp, cos[:, :, :p], sin[:, :, :p])
            if self.cfg.is_cross_layer(i):
                out_p = attention(qp, kp, vp, allowed[:, :p, :p])
                qs = expert_layer.query(xs, *cross_rope)
                ks, vs = expert_layer.cross_key_value(kp, vp)
                out_s = attention(qs, ks, vs, allowed[:, p:, :p])
            else:
                qs, ks, vs = expert_layer.query_key_value(xs, cos[:, :, p:], sin[:, :, p:])
                out = attention(
                    torch.cat([qp, qs], dim=2), torch.cat([kp, ks], dim=2), torch.cat([vp, vs], dim=2), allowed
                )
                out_p, out_s = out[:, :p], out[:, p:]
            xp, xs = vlm_layer.finish(xp, out_p), expert_layer.finish(xs, out_s)
        return self.action_out_proj(self.expert.norm(xs)[:, -self.cfg.action_horizon :].float())

    @torch.no_grad()
    def sample_actions(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        state: torch.Tensor,
        noise: torch.Tensor,
        num_steps: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Euler integration of the flow from t=1 (noise) to t=0 (actions); [B, H, action_dim] fp32."""
        num_steps = num_steps or self.cfg.num_steps
        prefix = self.embed_prefix(images, image_masks, tokens, token_masks, state)
        context = self.expert_context(self.compute_prefix_kv(*prefix)) if use_cache else None
        x_t = noise.float()
        b = x_t.shape[0]
        for step in range(num_steps):
            t = torch.full((b,), 1.0 - step / num_steps, dtype=torch.float32, device=x_t.device)
            if context is not None:
                v_t = self.velocity_cached(prefix[1], context, x_t, t)
            else:
                v_t = self.velocity_full(prefix, x_t, t)
            x_t = x_t - v_t / num_steps
        return x_t
