"""SmolVLA: SmolVLM2 prefix (SigLIP + pixel shuffle + SmolLM2) + a narrower SmolLM2 action expert.

Module names reproduce LeRobot's `VLAFlowMatching`, so `state_dict()` of this model is the
checkpoint minus LeRobot's `model.` policy prefix, which `checkpoint.py` removes and adds
(as π0 does). The text model has no final norm and no LM head: inference only reads its K/V.

The prefix is `[images | prompt | state token]`; images and prompt attend bidirectionally, the
state token sees them all and nothing in the prefix sees it. The stages (models/stages.py):
embed() runs SigLIP, the connector, the prompt and the state token; prefix() runs the (cut-down)
text model over the prefix once and keeps, per expert layer, what that layer attends to:
  * self-attention layers: the text layer's post-RoPE K/V, in a cache laid out [prefix ; suffix]
    whose suffix part each step writes in place; queries at positions continuing after the prefix;
  * cross-attention layers: the text layer's K/V re-projected by the expert layer's own
    k_proj/v_proj (step-invariant, so once per inference); queries at positions restarting from 0.
Each Euler step of denoise() then runs only the expert over the action tokens (causal among
themselves). LeRobot trains with one pass over [prefix ; suffix] whose prefix never attends to
the suffix, so the cached steps compute the same velocity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from quantvla_ros.models.common.attention import apply_rope, attend, attention_bias, make_att_2d_masks, rope_cos_sin
from quantvla_ros.models.common.embeddings import action_time_constant, action_time_tokens, sincos_time_embedding
from quantvla_ros.models.common.llama import RMSNorm, SwiGLUMLP
from quantvla_ros.models.common.siglip import SiglipVisionTransformer
from quantvla_ros.models.family import AttentionSite, attention_linears, decoder_linears, mlp_linears
from quantvla_ros.models.smolvla.config import SmolLMConfig, SmolVLAConfig
from quantvla_ros.models.stages import (
    Schedule,
    StagedModel,
    TimeConstants,
    Workspace,
    input_buffers,
    parameter_count,
)

# LeRobot's own apply_rope (half-split layout, same as HF) with max_wavelength 1e4; the rope_theta
# of SmolVLM2's text config is never read by SmolVLA.
ROPE_THETA = 10_000.0


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


@dataclass
class SmolVLAWorkspace(Workspace):
    prefix_embs: torch.Tensor  # [B, P, text width]: [images | prompt | state]
    prefix_pad: torch.Tensor  # [B, P] bool
    prefix_ar: torch.Tensor  # [1, P] bool: only the state token opens a new attention block (fixed)
    # Per self-attention expert layer [2, B, Hkv, P + S, head_dim]: post-RoPE prefix K/V, then the suffix's.
    self_kv: list[torch.Tensor]
    # Per cross-attention expert layer [2, B, Hkv, P, head_dim]: the prefix K/V through the layer's k/v_proj.
    cross_kv: list[torch.Tensor]
    suffix_allowed: torch.Tensor  # [1, S, S] bool: the action tokens are causal among themselves (fixed)
    suffix_offsets: torch.Tensor  # [S] int64, 0..S-1: suffix positions after the prefix's valid tokens
    self_mask: torch.Tensor  # [B, S, P + S] bool
    self_bias: torch.Tensor  # [B, 1, S, P + S]
    cross_mask: torch.Tensor  # [B, S, P] bool: the prefix's padding
    cross_bias: torch.Tensor  # [B, 1, S, P]
    self_cos: torch.Tensor  # [B, 1, S, head_dim] float32
    self_sin: torch.Tensor  # [B, 1, S, head_dim] float32
    cross_cos: torch.Tensor  # [1, 1, S, head_dim] float32: cross queries restart at position 0 (fixed)
    cross_sin: torch.Tensor  # [1, 1, S, head_dim] float32


@dataclass(frozen=True)
class SmolVLATimeConstants(TimeConstants):
    action_time: torch.Tensor  # [N, width]: action_time_constant() of the sincos embedding


class SmolVLAModel(StagedModel):
    FAMILY = "smolvla"
    LINEAR_GROUPS = {
        "llm": decoder_linears(_LLM),
        "expert_mlp": mlp_linears(_EXPERT),
        "expert_attention": attention_linears(_EXPERT),
    }

    def __init__(self, cfg: SmolVLAConfig) -> None:
        super().__init__(cfg)
        width = cfg.expert.width
        self.vlm_with_expert = SmolVLMWithExpert(cfg)
        self.state_proj = nn.Linear(cfg.max_state_dim, cfg.text.width)
        self.action_in_proj = nn.Linear(cfg.action_dim, width)
        self.action_out_proj = nn.Linear(width, cfg.action_dim)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)

    parameter_dtype = staticmethod(parameter_dtype)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vlm.vocab_size

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

    def component_parameters(self) -> dict[str, int]:
        """Parameter count per component (works on the meta device)."""
        counts = {
            "vision": parameter_count(self.vlm.vision_model, self.vlm.connector),
            "llm": parameter_count(self.llm),
            "expert": parameter_count(self.expert),
        }
        counts["action_projections"] = parameter_count(self) - sum(counts.values())
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix embeddings [images | prompt | state] and their padding mask."""
        scale = math.sqrt(self.cfg.text.width)  # LeRobot scales image and text embeddings alike
        img = self.embed_images(images) * scale
        img_pad = image_masks.repeat_interleave(img.shape[1] // images.shape[1], dim=1)
        txt = self.llm.embed_tokens(tokens).to(self.compute_dtype) * scale
        state_token = self.state_proj(state.float())[:, None, :].to(self.compute_dtype)
        state_pad = torch.ones_like(token_masks[:, :1])
        return torch.cat([img, txt, state_token], dim=1), torch.cat([img_pad, token_masks, state_pad], dim=1)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.cfg.text.head_dim, ROPE_THETA)

    # ---- stages ------------------------------------------------------------------------
    def workspace(self, image_shape: tuple[int, ...], prompt_len: int) -> SmolVLAWorkspace:
        cfg, dev, dtype = self.cfg, self.device, self.compute_dtype
        b, c = image_shape[:2]
        text, s = cfg.text, cfg.action_horizon
        p = c * cfg.vlm.tokens_per_image + prompt_len + 1
        heads, head_dim = text.num_kv_heads, text.head_dim
        layers = range(cfg.expert.depth)
        prefix_ar = torch.zeros(1, p, dtype=torch.bool, device=dev)
        prefix_ar[:, -1] = True
        suffix_ar = torch.ones(1, s, dtype=torch.bool, device=dev)
        cross_cos, cross_sin = self.rope(torch.arange(s, device=dev)[None])

        def kv(length: int) -> torch.Tensor:
            return torch.zeros(2, b, heads, length, head_dim, dtype=dtype, device=dev)

        return SmolVLAWorkspace(
            **input_buffers(cfg, image_shape, prompt_len, dev),
            prefix_embs=torch.zeros(b, p, text.width, dtype=dtype, device=dev),
            prefix_pad=torch.zeros(b, p, dtype=torch.bool, device=dev),
            prefix_ar=prefix_ar,
            self_kv=[kv(p + s) for i in layers if not cfg.is_cross_layer(i)],
            cross_kv=[kv(p) for i in layers if cfg.is_cross_layer(i)],
            suffix_allowed=make_att_2d_masks(suffix_ar, suffix_ar),
            suffix_offsets=torch.arange(s, device=dev),
            self_mask=torch.zeros(b, s, p + s, dtype=torch.bool, device=dev),
            self_bias=torch.zeros(b, 1, s, p + s, dtype=dtype, device=dev),
            cross_mask=torch.zeros(b, s, p, dtype=torch.bool, device=dev),
            cross_bias=torch.zeros(b, 1, s, p, dtype=dtype, device=dev),
            self_cos=torch.zeros(b, 1, s, head_dim, device=dev),
            self_sin=torch.zeros(b, 1, s, head_dim, device=dev),
            cross_cos=cross_cos,
            cross_sin=cross_sin,
        )

    def embed(self, ws: SmolVLAWorkspace) -> None:
        embs, pad = self.embed_prefix(ws.images, ws.image_masks, ws.tokens, ws.token_masks, ws.state)
        ws.prefix_embs.copy_(embs)
        ws.prefix_pad.copy_(pad)

    def _caches(self, ws: SmolVLAWorkspace) -> list[tuple[bool, torch.Tensor]]:
        """(is cross, cache) of every expert layer, in layer order."""
        self_kv, cross_kv = iter(ws.self_kv), iter(ws.cross_kv)
        cross = [self.cfg.is_cross_layer(i) for i in range(self.cfg.expert.depth)]
        return [(c, next(cross_kv) if c else next(self_kv)) for c in cross]

    def prefix(self, ws: SmolVLAWorkspace) -> None:
        """The text layers over the prefix, filling what each expert layer attends to; then the
        suffix's masks and RoPE tables, which depend on the prefix's padding only."""
        dtype = self.compute_dtype
        pad = ws.prefix_pad
        b, p = pad.shape
        cos, sin = self.rope(torch.cumsum(pad.long(), dim=1) - 1)
        bias = attention_bias(make_att_2d_masks(pad, ws.prefix_ar.expand(b, p)), dtype)
        x = ws.prefix_embs
        layers = self.llm.layers
        for i, (layer, expert_layer, (cross, cache)) in enumerate(
            zip(layers, self.expert.layers, self._caches(ws), strict=True)
        ):
            q, k, v = layer.query_key_value(x, cos, sin)
            if cross:
                k_cross, v_cross = expert_layer.cross_key_value(k, v)
                cache[0].copy_(k_cross)
                cache[1].copy_(v_cross)
            else:
                cache[0, :, :, :p].copy_(k)
                cache[1, :, :, :p].copy_(v)
            # The expert reads only the K/V of the last layer, never its output.
            if i + 1 < len(layers):
                x = layer.finish(x, attend(q, k, v, bias))
        s = ws.suffix_allowed.shape[1]
        ws.cross_mask.copy_(pad[:, None, :].expand(b, s, p))
        ws.cross_bias.copy_(attention_bias(ws.cross_mask, dtype))
        ws.self_mask.copy_(torch.cat([ws.cross_mask, ws.suffix_allowed.expand(b, s, s)], dim=2))
        ws.self_bias.copy_(attention_bias(ws.self_mask, dtype))
        cos, sin = self.rope(pad.sum(dim=1, keepdim=True) + ws.suffix_offsets)
        ws.self_cos.copy_(cos)
        ws.self_sin.copy_(sin)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """t = 1, 1 - 1/n, ..., 1/n: the flow runs from noise (t = 1) to actions (t = 0)."""
        return torch.tensor([1.0 - step / num_steps for step in range(num_steps)], device=self.device)

    def time_constants(self, t: torch.Tensor) -> SmolVLATimeConstants:
        cfg = self.cfg
        time_emb = sincos_time_embedding(t, cfg.expert.width, cfg.min_period, cfg.max_period)
        return SmolVLATimeConstants(action_time_constant(self.action_time_mlp_in, time_emb))

    def denoise(self, ws: SmolVLAWorkspace, schedule: Schedule) -> None:
        """Euler steps from t = 1 (noise) to t = 0 (actions)."""
        n = schedule.num_steps
        x_t = ws.actions
        x_t.copy_(ws.noise)
        for step in range(n):
            x_t.sub_(self.velocity(ws, x_t, schedule.constants.row(step)) / n)

    def velocity(self, ws: SmolVLAWorkspace, x_t: torch.Tensor, time: SmolVLATimeConstants) -> torch.Tensor:
        """The flow's velocity [B, horizon, action_dim] at actions x_t, from the expert alone over
        the prefix context; `time` holds one row of time_constants() (or one per sample)."""
        action_emb = self.action_in_proj(x_t.float())
        x = action_time_tokens(self.action_time_mlp_in, self.action_time_mlp_out, action_emb, time.action_time)
        x = x.to(self.compute_dtype)
        p = ws.prefix_pad.shape[1]
        for i, (layer, (cross, cache)) in enumerate(zip(self.expert.layers, self._caches(ws), strict=True)):
            if cross:
                q, bias, mask = layer.query(x, ws.cross_cos, ws.cross_sin), ws.cross_bias, ws.cross_mask
                own = None
            else:
                q, k, v = layer.query_key_value(x, ws.self_cos, ws.self_sin)
                cache[0, :, :, p:].copy_(k)
                cache[1, :, :, p:].copy_(v)
                bias, mask, own = ws.self_bias, ws.self_mask, x.shape[1]
            if self.attention_observer is not None:
                self.attention_observer(i, q, cache[0], mask, own)
            x = layer.finish(x, attend(q, cache[0], cache[1], bias))
        return self.action_out_proj(self.expert.norm(x)[:, -self.cfg.action_horizon :].float())
