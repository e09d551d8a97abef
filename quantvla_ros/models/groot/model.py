"""GR00T N1.5: Eagle 2.5 backbone (SigLIP-2 + Qwen3) + flow-matching DiT action head.

Module names reproduce NVIDIA's checkpoint keys (Isaac-GR00T `gr00t/model/gr00t_n1.py`,
`backbone/eagle_backbone.py`, `action_head/{flow_matching_action_head,cross_attention_dit}.py`;
the same modules as LeRobot v0.5.1 `policies/groot/`), so `state_dict()` is the checkpoint.

The stages (models/stages.py): embed() runs SigLIP-2 and mlp1 and puts the image features in
place of the prompt's `<IMG_CONTEXT>` embeddings; prefix() runs Qwen3, `vlln` and the VL
self-attention once and projects the VL tokens to the K/V of every cross-attention block (they
do not depend on the step); the 4 Euler steps of denoise() (t from 0 to 1) then run only the
DiT, whose even blocks cross-attend to those K/V. What the timesteps determine (the timestep
encoder, every AdaLayerNorm's (scale, shift), the output layer's (shift, scale) and the action
encoder's sinusoidal time through the time half of its W2) is computed once per timestep.

GR00T pads prompts only to the longest one in a batch and attends without a mask after the
LLM, so a single observation sees no padding. This model pads every prompt to max_token_len,
so it masks the padding as keys in the VL self-attention and the DiT cross-attention too:
the result does not depend on the padding, and equals GR00T's for one observation.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_ros.models.common.attention import attention_bias
from quantvla_ros.models.common.qwen3 import Qwen3LanguageModel
from quantvla_ros.models.common.siglip import SiglipVisionTower
from quantvla_ros.models.family import AttentionSite
from quantvla_ros.models.groot.config import GR00TConfig, TransformerConfig
from quantvla_ros.models.stages import (
    Schedule,
    StagedModel,
    TimeConstants,
    Workspace,
    input_buffers,
    parameter_count,
)

KV = tuple[torch.Tensor, torch.Tensor]


# ---- small pieces ----------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activations' dtype (its weights stay fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def timestep_projection(tau: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1)`: [cos, sin] of τ·ω_k,
    ω_k = max_period^(-k / (dim/2 - 1))."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=tau.device) / (half - 1)
    angle = tau.float()[:, None] * exponent.exp()[None]
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


def action_time_encoding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """GR00T's SinusoidalPositionalEncoding of τ: [sin, cos] of τ·10000^(-k / (dim/2))."""
    half = dim // 2
    exponent = -torch.arange(half, dtype=torch.float32, device=tau.device) * (math.log(10_000.0) / half)
    angle = tau.float()[:, None] * exponent.exp()[None]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class CategorySpecificLinear(nn.Module):
    """One Linear per embodiment: W [embodiments, in, out], b [embodiments, out]."""

    def __init__(self, num_categories: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.zeros(num_categories, in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(num_categories, out_dim))

    def forward(self, x: torch.Tensor, category: int) -> torch.Tensor:
        return x.float() @ self.W[category] + self.b[category]


class CategorySpecificMLP(nn.Module):
    def __init__(self, num_categories: int, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layer1 = CategorySpecificLinear(num_categories, in_dim, hidden_dim)
        self.layer2 = CategorySpecificLinear(num_categories, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, category: int) -> torch.Tensor:
        return self.layer2(F.relu(self.layer1(x, category)), category)


class MultiEmbodimentActionEncoder(nn.Module):
    """W3(swish(W2([W1(a) ; sincos(τ)]))), each W per embodiment.

    W2 is linear in its input, so its time half (with its bias) depends on τ only: time_constant()
    computes it once per timestep and forward() adds it to the action half."""

    def __init__(self, num_categories: int, action_dim: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.W1 = CategorySpecificLinear(num_categories, action_dim, width)
        self.W2 = CategorySpecificLinear(num_categories, 2 * width, width)
        self.W3 = CategorySpecificLinear(num_categories, width, width)

    def time_constant(self, tau: torch.Tensor, category: int) -> torch.Tensor:
        """[N, width]: sincos(τ) through the time half of W2, plus W2's bias."""
        w2 = self.W2
        return action_time_encoding(tau, self.width) @ w2.W[category, self.width :] + w2.b[category]

    def forward(self, actions: torch.Tensor, time: torch.Tensor, category: int) -> torch.Tensor:
        """actions [B, H, action_dim] and a time_constant() row [B or 1, width] -> [B, H, width]."""
        fused = self.W1(actions, category) @ self.W2.W[category, : self.width] + time[:, None, :]
        return self.W3(F.silu(fused), category)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, width: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEncoder(nn.Module):
    PROJECTION_DIM = 256

    def __init__(self, width: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(self.PROJECTION_DIM, width)

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(timestep_projection(tau, self.PROJECTION_DIM))


# ---- diffusers-style transformer blocks --------------------------------------------------------
class Attention(nn.Module):
    """diffusers `Attention` with biases: self-attention, or cross-attention to a `context_dim` sequence."""

    def __init__(self, cfg: TransformerConfig, width: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.to_q = nn.Linear(width, cfg.width)
        self.to_k = nn.Linear(context_dim or width, cfg.width)
        self.to_v = nn.Linear(context_dim or width, cfg.width)
        self.to_out = nn.ModuleList([nn.Linear(cfg.width, width)])

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, context: torch.Tensor) -> KV:
        return self.heads(self.to_k(context)), self.heads(self.to_v(context))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.to_q(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """q [B, H, T, d] over k/v (from project_kv) with an additive key bias (None: every key) -> [B, T, width]."""
        b, _, t, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GELUProjection(nn.Module):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """diffusers FeedForward("gelu-approximate", mult 4); `net.1` is its dropout, a no-op at inference,
    held as Identity so the output Linear keeps its checkpoint name `net.2`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(width, 4 * width), nn.Identity(), nn.Linear(4 * width, width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class VLSelfAttentionBlock(nn.Module):
    """BasicTransformerBlock with affine pre-LayerNorms (eps 1e-5) and plain residuals."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=1e-5)
        self.attn1 = Attention(cfg, cfg.width)
        self.norm3 = LayerNorm(cfg.width, eps=1e-5)
        self.ff = FeedForward(cfg.width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn1.attend(self.attn1.query(h), *self.attn1.project_kv(h), bias)
        return x + self.ff(self.norm3(x))


class SelfAttentionTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(VLSelfAttentionBlock(cfg) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, width] with padding keys marked False in key_mask [B, T]."""
        b, t = key_mask.shape
        bias = attention_bias(key_mask[:, None, :].expand(b, t, t), x.dtype)
        for block in self.transformer_blocks:
            x = block(x, bias)
        return x


class AdaLayerNorm(nn.Module):
    """LN without affine (eps 1e-5), modulated as n·(1 + scale) + shift with (scale, shift) = linear(silu(temb))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)
        self.norm = LayerNorm(width, eps=1e-5, elementwise_affine=False)

    def modulation(self, temb: torch.Tensor) -> torch.Tensor:
        """temb [N, width] -> [N, 2 * width], (scale, shift) side by side; depends on the timestep only."""
        return self.linear(F.silu(temb.float()))

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """The norm of x [B, T, width] under a modulation() output ([B or 1, 2 * width])."""
        scale, shift = modulation[:, None, :].chunk(2, dim=-1)
        return (self.norm(x).float() * (1 + scale) + shift).to(x.dtype)


class DiTBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, context_dim: int | None) -> None:
        super().__init__()
        self.norm1 = AdaLayerNorm(cfg.width)
        self.attn1 = Attention(cfg, cfg.width, context_dim)
        self.norm3 = LayerNorm(cfg.width, eps=1e-5, elementwise_affine=False)
        self.ff = FeedForward(cfg.width)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        kv: KV | None,
        bias: torch.Tensor | None,
        observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """kv: the VL tokens' K/V for a cross-attention block (`bias` masks their padding), None
        for a self-attention one; observe(q, k) sees the queries and keys before attention."""
        h = self.norm1(x, modulation)
        q = self.attn1.query(h)
        k, v = self.attn1.project_kv(h) if kv is None else kv
        if observe is not None:
            observe(q, k)
        x = x + self.attn1.attend(q, k, v, bias)
        return x + self.ff(self.norm3(x))


class DiT(nn.Module):
    """16 blocks; even ones cross-attend to the VL tokens, odd ones self-attend (interleave_self_attention)."""

    def __init__(self, cfg: TransformerConfig, context_dim: int, output_dim: int) -> None:
        super().__init__()
        width = cfg.width
        self.timestep_encoder = TimestepEncoder(width)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(cfg, context_dim if self.is_cross(i) else None) for i in range(cfg.depth)
        )
        self.norm_out = LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(width, 2 * width)
        self.proj_out_2 = nn.Linear(width, output_dim)

    @staticmethod
    def is_cross(block: int) -> bool:
        return block % 2 == 0

    def time_modulations(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What τ [N] determines: every block's norm1 (scale, shift) [N, depth, 2 * width] and the
        output layer's (shift, scale) [N, 2 * width]."""
        temb = self.timestep_encoder(tau)
        blocks = torch.stack([block.norm1.modulation(temb) for block in self.transformer_blocks], dim=1)
        return blocks, self.proj_out_1(F.silu(temb.float()))

    def cross_kv(self, context: torch.Tensor) -> list[KV | None]:
        """The step-invariant K/V of every cross-attention block (None at self-attention blocks)."""
        return [
            block.attn1.project_kv(context) if self.is_cross(i) else None
            for i, block in enumerate(self.transformer_blocks)
        ]

    def forward(
        self,
        x: torch.Tensor,
        modulations: torch.Tensor,
        cross_kv: list[KV | None],
        cross_bias: torch.Tensor | None,
        observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """The blocks over tokens x [B, T, width] under time_modulations()' block part ([B or 1, depth, 2 * width]);
        observe(block, q, k) sees every attention's queries and keys."""
        for i, (block, kv) in enumerate(zip(self.transformer_blocks, cross_kv, strict=True)):
            seen = None if observe is None else functools.partial(observe, i)
            x = block(x, modulations[:, i], kv, cross_bias if kv is not None else None, seen)
        return x

    def output(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """The output layer on x [B, T, width] under time_modulations()' output part ([B or 1, 2 * width]);
        it splits (shift, scale), the reverse of AdaLayerNorm's (scale, shift)."""
        shift, scale = modulation[:, None, :].chunk(2, dim=-1)
        return self.proj_out_2(self.norm_out(x).float() * (1 + scale) + shift)


# ---- backbone and head -------------------------------------------------------------------------
class EagleModel(nn.Module):
    def __init__(self, cfg: GR00TConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTower(cfg.vision)
        # Eagle's one-Linear connector without pixel shuffle (`mlp_connector_layers: 1`).
        self.mlp1 = nn.Sequential(nn.Linear(cfg.vision.width, cfg.llm.width))
        self.language_model = Qwen3LanguageModel(cfg.llm)


class EagleBackbone(nn.Module):
    def __init__(self, cfg: GR00TConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.eagle_model = EagleModel(cfg)

    def embed(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """images [B, C, 3, S, S] and tokens [B, L] with C·patches `<IMG_CONTEXT>` each (checked by
        GR00TN15Model.check_inputs) -> the LLM's input embeddings [B, L, width]."""
        eagle = self.eagle_model
        vit = eagle.mlp1(eagle.vision_model(images.flatten(0, 1)))
        embeds = eagle.language_model.model.embed_tokens(tokens)
        b, _, width = embeds.shape
        # Image features replace the placeholder embeddings in order, image by image: the k-th
        # placeholder of a row takes the row's k-th feature, found by a running count (no host sync).
        slots = tokens == self.cfg.image_token_id
        index = (slots.cumsum(dim=1) - 1).clamp(min=0)
        features = vit.to(embeds.dtype).reshape(b, -1, width).gather(1, index[..., None].expand(-1, -1, width))
        return torch.where(slots[..., None], features, embeds)


class FlowmatchingActionHead(nn.Module):
    def __init__(self, cfg: GR00TConfig) -> None:
        super().__init__()
        e, width = cfg.num_embodiments, cfg.input_embedding_dim
        self.model = DiT(cfg.dit, context_dim=cfg.llm.width, output_dim=cfg.dit_output_dim)
        self.state_encoder = CategorySpecificMLP(e, cfg.max_state_dim, cfg.hidden_size, width)
        self.action_encoder = MultiEmbodimentActionEncoder(e, cfg.action_dim, width)
        self.action_decoder = CategorySpecificMLP(e, cfg.hidden_size, cfg.hidden_size, cfg.action_dim)
        self.future_tokens = nn.Embedding(cfg.num_target_vision_tokens, width)
        self.vlln = LayerNorm(cfg.llm.width, eps=1e-5)
        self.vl_self_attention = SelfAttentionTransformer(cfg.vl_self_attention)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, width)


_LLM = "backbone.eagle_model.language_model.model.layers"
_DIT = "action_head.model.transformer_blocks"
# Kept fp32 in a bf16 model besides every norm: the per-embodiment MLPs, the learned token
# tables, the time embedding and the DiT's output layer (small, and they set the velocity's scale).
_LOW_PRECISION_PREFIXES = (
    "backbone.",
    "action_head.vl_self_attention.",
    f"{_DIT}.",
)


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The backbone and the transformer Linears in `dtype`; norms (outside the vision tower) and the
    head's small modules in fp32."""
    if name.startswith("backbone.eagle_model.vision_model.") or name.startswith("backbone.eagle_model.mlp1."):
        return dtype
    if not name.startswith(_LOW_PRECISION_PREFIXES) or "norm" in name:
        return torch.float32
    return dtype


@dataclass
class GR00TWorkspace(Workspace):
    embeds: torch.Tensor  # [B, L, llm width]: prompt embeddings with the image features in their slots
    cross_kv: list[torch.Tensor]  # per cross block [2, B, heads, L, head_dim]: the VL tokens' K/V
    cross_mask: torch.Tensor  # [B, T, L] bool: DiT tokens to VL tokens, padding masked
    cross_bias: torch.Tensor  # [B, 1, T, L]: the same as an additive bias
    self_mask: torch.Tensor  # [B, T, T] bool, all True: what the self-attention blocks see (fixed)
    dit_tokens: torch.Tensor  # [B, T, width]: state token, future tokens, action tokens


@dataclass(frozen=True)
class GR00TTimeConstants(TimeConstants):
    modulations: torch.Tensor  # [N, depth, 2 * width]: every DiT block's norm1 (scale, shift)
    output: torch.Tensor  # [N, 2 * width]: proj_out_1's (shift, scale)
    action_time: torch.Tensor  # [N, width]: the action encoder's time_constant()


class GR00TN15Model(StagedModel):
    FAMILY = "groot_n1_5"
    LINEAR_GROUPS = {
        "llm": rf"{re.escape(_LLM)}\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
        "expert_mlp": rf"{re.escape(_DIT)}\.\d+\.ff\.net\.(0\.proj|2)",
        "expert_attention": rf"{re.escape(_DIT)}\.\d+\.attn1\.(to_[qkv]|to_out\.0)",
    }

    def __init__(self, cfg: GR00TConfig) -> None:
        super().__init__(cfg)
        self.backbone = EagleBackbone(cfg)
        self.action_head = FlowmatchingActionHead(cfg)

    parameter_dtype = staticmethod(parameter_dtype)

    @property
    def vocab_size(self) -> int:
        return self.cfg.llm.vocab_size

    @property
    def display_name(self) -> str:
        return "GR00T N1.5"

    def attention_sites(self) -> list[AttentionSite]:
        d = self.cfg.dit
        return [
            AttentionSite(f"{_DIT}.{i}.attn1.to_q", f"{_DIT}.{i}.attn1.to_out.0", d.num_heads, d.head_dim)
            for i in range(d.depth)
        ]

    def component_parameters(self) -> dict[str, int]:
        """Parameter count per component (works on the meta device)."""
        eagle, head = self.backbone.eagle_model, self.action_head
        return {
            "vision": parameter_count(eagle.vision_model, eagle.mlp1),
            "llm": parameter_count(eagle.language_model),
            "expert": parameter_count(head.model),
            "vl_self_attention": parameter_count(head.vlln, head.vl_self_attention),
            "embodiment_mlps": parameter_count(head.state_encoder, head.action_encoder, head.action_decoder),
            "action_tokens": parameter_count(head.future_tokens, head.position_embedding),
        }

    # ---- stages ------------------------------------------------------------------------------
    def check_inputs(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        state: torch.Tensor,
        noise: torch.Tensor,
    ) -> None:
        """Also: each prompt holds one `<IMG_CONTEXT>` per image token (a host sync, before the stages)."""
        super().check_inputs(images, image_masks, tokens, token_masks, state, noise)
        cameras = images.shape[1]
        per_row = (tokens == self.cfg.image_token_id).sum(dim=1)
        want = cameras * self.cfg.tokens_per_image
        if bool((per_row != want).any()):
            raise ValueError(
                f"Each prompt needs {want} <IMG_CONTEXT> tokens for {cameras} image(s), got {per_row.tolist()}; "
                "build the prompt with this checkpoint's processor."
            )

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """Also: the image placeholders after a short chat-template head, as the processor lays the prompt out."""
        inputs = super().example_inputs(batch, seed)
        cfg = self.cfg
        tokens = inputs["tokens"] % cfg.image_token_id
        tokens[:, 8 : 8 + len(cfg.camera_names) * cfg.tokens_per_image] = cfg.image_token_id
        return {**inputs, "tokens": tokens}

    def workspace(self, image_shape: tuple[int, ...], prompt_len: int) -> GR00TWorkspace:
        cfg, dev, dtype = self.cfg, self.device, self.compute_dtype
        b, dit = image_shape[0], cfg.dit
        t = 1 + cfg.num_target_vision_tokens + cfg.action_horizon
        cross = [i for i in range(dit.depth) if DiT.is_cross(i)]
        return GR00TWorkspace(
            **input_buffers(cfg, image_shape, prompt_len, dev),
            embeds=torch.zeros(b, prompt_len, cfg.llm.width, dtype=dtype, device=dev),
            cross_kv=[
                torch.zeros(2, b, dit.num_heads, prompt_len, dit.head_dim, dtype=dtype, device=dev) for _ in cross
            ],
            cross_mask=torch.zeros(b, t, prompt_len, dtype=torch.bool, device=dev),
            cross_bias=torch.zeros(b, 1, t, prompt_len, dtype=dtype, device=dev),
            self_mask=torch.ones(b, t, t, dtype=torch.bool, device=dev),
            dit_tokens=torch.zeros(b, t, cfg.input_embedding_dim, dtype=dtype, device=dev),
        )

    def embed(self, ws: GR00TWorkspace) -> None:
        """GR00T has no image mask: every camera is an input, so `image_masks` is not read."""
        ws.embeds.copy_(self.backbone.embed(ws.images.to(self.compute_dtype), ws.tokens))

    def prefix(self, ws: GR00TWorkspace) -> None:
        """Qwen3, vlln and the VL self-attention over the prompt, then every cross block's K/V of the VL tokens."""
        head, mask = self.action_head, ws.token_masks
        features = self.backbone.eagle_model.language_model.model(ws.embeds, mask)
        vl = head.vl_self_attention(head.vlln(features), mask)
        for cache, kv in zip(ws.cross_kv, [kv for kv in head.model.cross_kv(vl) if kv is not None], strict=True):
            cache[0].copy_(kv[0])
            cache[1].copy_(kv[1])
        b, t, length = ws.cross_mask.shape
        ws.cross_mask.copy_(mask[:, None, :].expand(b, t, length))
        ws.cross_bias.copy_(attention_bias(ws.cross_mask, self.compute_dtype))

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """τ = int(t · buckets) for t = 0, 1/n, ...: {0, 250, 500, 750} for 4 steps of 1000 buckets."""
        buckets = self.cfg.num_timestep_buckets
        return torch.tensor([int(step / num_steps * buckets) for step in range(num_steps)], device=self.device)

    def time_constants(self, t: torch.Tensor) -> GR00TTimeConstants:
        head = self.action_head
        modulations, output = head.model.time_modulations(t)
        return GR00TTimeConstants(modulations, output, head.action_encoder.time_constant(t, self.cfg.embodiment_id))

    def denoise(self, ws: GR00TWorkspace, schedule: Schedule) -> None:
        """Euler steps from t = 0 (noise) to t = 1 (actions)."""
        head, cfg = self.action_head, self.cfg
        horizon = cfg.action_horizon
        # The state token and the future tokens are the same on every step.
        ws.dit_tokens[:, :1].copy_(head.state_encoder(ws.state[:, None, :], cfg.embodiment_id))
        ws.dit_tokens[:, 1:-horizon].copy_(head.future_tokens.weight)
        x_t = ws.actions
        x_t.copy_(ws.noise)
        dt = 1.0 / schedule.num_steps
        for step in range(schedule.num_steps):
            x_t.add_(self.velocity(ws, x_t, schedule.constants.row(step)), alpha=dt)

    def velocity(self, ws: GR00TWorkspace, x_t: torch.Tensor, time: GR00TTimeConstants) -> torch.Tensor:
        """The flow's velocity [B, horizon, action_dim] at actions x_t; `time` holds one row of time_constants()."""
        head, cfg = self.action_head, self.cfg
        horizon, e = cfg.action_horizon, cfg.embodiment_id
        action_tokens = head.action_encoder(x_t, time.action_time, e) + head.position_embedding.weight[:horizon]
        ws.dit_tokens[:, -horizon:].copy_(action_tokens)
        cross = iter(ws.cross_kv)
        kv = [tuple(next(cross)) if DiT.is_cross(i) else None for i in range(cfg.dit.depth)]
        observe = None
        if self.attention_observer is not None:

            def observe(block: int, q: torch.Tensor, k: torch.Tensor) -> None:
                if DiT.is_cross(block):
                    self.attention_observer(block, q, k, ws.cross_mask, None)
                else:
                    self.attention_observer(block, q, k, ws.self_mask, k.shape[2])

        x = head.model(ws.dit_tokens, time.modulations, kv, ws.cross_bias, observe)
        # The output layer is per token and only the action tokens are read.
        return head.action_decoder(head.model.output(x[:, -horizon:], time.output), e)
