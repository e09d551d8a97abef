"""GR00T N1.5: Eagle 2.5 backbone (SigLIP-2 + Qwen3) + flow-matching DiT action head.

Module names reproduce NVIDIA's checkpoint keys (Isaac-GR00T `gr00t/model/gr00t_n1.py`,
`backbone/eagle_backbone.py`, `action_head/{flow_matching_action_head,cross_attention_dit}.py`;
the same modules as LeRobot v0.5.1 `policies/groot/`), so `state_dict()` is the checkpoint.

Inference runs the backbone, `vlln` and the VL self-attention once; the 4 Euler steps (t from
0 to 1) then run only the DiT, whose even blocks cross-attend to the VL tokens. Those blocks'
K/V projections do not depend on the step, so they are computed once before the loop.

GR00T pads prompts only to the longest one in a batch and attends without a mask after the
LLM, so a single observation sees no padding. This model pads every prompt to max_token_len,
so it masks the padding as keys in the VL self-attention and the DiT cross-attention too:
the result does not depend on the padding, and equals GR00T's for one observation.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_ros.models.common.attention import attention_bias
from quantvla_ros.models.common.qwen3 import Qwen3LanguageModel
from quantvla_ros.models.common.siglip import SiglipVisionTower
from quantvla_ros.models.family import AttentionObserver, AttentionSite
from quantvla_ros.models.groot.config import GR00TConfig, TransformerConfig

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
    """W3(swish(W2([W1(a) ; sincos(τ)]))), each W per embodiment."""

    def __init__(self, num_categories: int, action_dim: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.W1 = CategorySpecificLinear(num_categories, action_dim, width)
        self.W2 = CategorySpecificLinear(num_categories, 2 * width, width)
        self.W3 = CategorySpecificLinear(num_categories, width, width)

    def forward(self, actions: torch.Tensor, tau: torch.Tensor, category: int) -> torch.Tensor:
        a = self.W1(actions, category)
        time = action_time_encoding(tau, self.width)[:, None, :].expand(-1, actions.shape[1], -1)
        return self.W3(F.silu(self.W2(torch.cat([a, time], dim=-1), category)), category)


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

    def forward(
        self,
        x: torch.Tensor,
        kv: KV,
        key_mask: torch.Tensor | None,
        observe: AttentionObserver | None = None,
        site: int = 0,
    ) -> torch.Tensor:
        """x [B, T, width] attends to kv (from project_kv); key_mask [B, S] bool or None (all keys)."""
        q = self.heads(self.to_q(x))
        k, v = kv
        b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
        allowed = None if key_mask is None else key_mask[:, None, :].expand(b, tq, tk)
        if observe is not None:
            seen = torch.ones(b, tq, tk, dtype=torch.bool, device=q.device) if allowed is None else allowed
            observe(site, q, k, seen)
        bias = None if allowed is None else attention_bias(allowed, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, tq, -1))


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

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h, self.attn1.project_kv(h), key_mask)
        return x + self.ff(self.norm3(x))


class SelfAttentionTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(VLSelfAttentionBlock(cfg) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            x = block(x, key_mask)
        return x


class AdaLayerNorm(nn.Module):
    """LN without affine (eps 1e-5), modulated as n·(1 + scale) + shift with (scale, shift) = linear(silu(temb))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)
        self.norm = LayerNorm(width, eps=1e-5, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.modulate(x, self.modulation(temb))

    def modulation(self, temb: torch.Tensor) -> torch.Tensor:
        """temb [B, width] -> [B, 2 * width], (scale, shift) side by side.

        Depends on the timestep only, so an inference engine can compute it once per schedule.
        """
        return self.linear(F.silu(temb.float()))

    def modulate(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
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
        temb: torch.Tensor,
        kv: KV | None,
        key_mask: torch.Tensor | None,
        observe: AttentionObserver | None,
        site: int,
    ) -> torch.Tensor:
        """kv: the VL tokens' K/V for a cross-attention block, None for a self-attention one."""
        h = self.norm1(x, temb)
        x = x + self.attn1(h, self.attn1.project_kv(h) if kv is None else kv, key_mask, observe, site)
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

    def cross_kv(self, context: torch.Tensor) -> list[KV | None]:
        """The step-invariant K/V of every cross-attention block (None at self-attention blocks)."""
        return [
            block.attn1.project_kv(context) if self.is_cross(i) else None
            for i, block in enumerate(self.transformer_blocks)
        ]

    def forward(
        self,
        x: torch.Tensor,
        tau: torch.Tensor,
        cross_kv: list[KV | None],
        context_mask: torch.Tensor,
        observe: AttentionObserver | None = None,
    ) -> torch.Tensor:
        temb = self.timestep_encoder(tau)
        for i, (block, kv) in enumerate(zip(self.transformer_blocks, cross_kv, strict=True)):
            x = block(x, temb, kv, context_mask if kv is not None else None, observe, i)
        return self.output(x, temb)

    def output(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The output layer; it splits (shift, scale), the reverse of AdaLayerNorm's (scale, shift)."""
        return self.modulated_output(x, self.output_modulation(temb))

    def output_modulation(self, temb: torch.Tensor) -> torch.Tensor:
        """temb [B, width] -> [B, 2 * width], (shift, scale) side by side; depends on the timestep only."""
        return self.proj_out_1(F.silu(temb.float()))

    def modulated_output(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """The output layer on x [B, T, width] under an output_modulation() ([B or 1, 2 * width])."""
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

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, token_masks: torch.Tensor) -> torch.Tensor:
        """images [B, C, 3, S, S], tokens [B, L] with C·patches `<IMG_CONTEXT>` each -> features [B, L, width]."""
        eagle = self.eagle_model
        b, c = images.shape[:2]
        vit = eagle.mlp1(eagle.vision_model(images.flatten(0, 1)))
        llm = eagle.language_model.model
        embeds = llm.embed_tokens(tokens)
        slots = tokens == self.cfg.image_token_id
        per_row = slots.sum(dim=1)
        if bool((per_row != c * vit.shape[1]).any()):
            raise ValueError(
                f"Each prompt needs {c * vit.shape[1]} <IMG_CONTEXT> tokens for {c} image(s), got {per_row.tolist()}; "
                "build the prompt with this checkpoint's processor."
            )
        # Image features replace the placeholder embeddings in order, image by image.
        embeds = embeds.masked_scatter(slots[..., None], vit.to(embeds.dtype).reshape(b, -1, embeds.shape[-1]))
        return llm(embeds, token_masks)


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


class GR00TN15Model(nn.Module):
    FAMILY = "groot_n1_5"
    LINEAR_GROUPS = {
        "llm": rf"{re.escape(_LLM)}\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
        "expert_mlp": rf"{re.escape(_DIT)}\.\d+\.ff\.net\.(0\.proj|2)",
        "expert_attention": rf"{re.escape(_DIT)}\.\d+\.attn1\.(to_[qkv]|to_out\.0)",
    }

    def __init__(self, cfg: GR00TConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = torch.float32
        # Set by calibration; called in every DiT attention on every step, site = block index.
        self.attention_observer: AttentionObserver | None = None
        self.backbone = EagleBackbone(cfg)
        self.action_head = FlowmatchingActionHead(cfg)

    @property
    def device(self) -> torch.device:
        return self.action_head.future_tokens.weight.device

    @property
    def display_name(self) -> str:
        return "GR00T N1.5"

    def attention_sites(self) -> list[AttentionSite]:
        d = self.cfg.dit
        return [
            AttentionSite(f"{_DIT}.{i}.attn1.to_q", f"{_DIT}.{i}.attn1.to_out.0", d.num_heads, d.head_dim)
            for i in range(d.depth)
        ]

    def set_dtype(self, dtype: torch.dtype) -> GR00TN15Model:
        for name, param in self.named_parameters():
            param.data = param.data.to(parameter_dtype(name, dtype))
        self.compute_dtype = dtype
        return self

    def component_parameters(self) -> dict[str, int]:
        """Parameter count per component (works on the meta device)."""
        eagle, head = self.backbone.eagle_model, self.action_head

        def count(*modules: nn.Module) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        return {
            "vision": count(eagle.vision_model, eagle.mlp1),
            "llm": count(eagle.language_model),
            "expert": count(head.model),
            "vl_self_attention": count(head.vlln, head.vl_self_attention),
            "embodiment_mlps": count(head.state_encoder, head.action_encoder, head.action_decoder),
            "action_tokens": count(head.future_tokens, head.position_embedding),
        }

    # ---- inference -------------------------------------------------------------------------------
    def embed_vl(self, images: torch.Tensor, tokens: torch.Tensor, token_masks: torch.Tensor) -> torch.Tensor:
        """The VL tokens the DiT attends to: backbone features through `vlln` and the VL self-attention."""
        head = self.action_head
        features = self.backbone(images.to(self.compute_dtype), tokens, token_masks)
        return head.vl_self_attention(head.vlln(features), token_masks)

    def velocity(
        self,
        state_features: torch.Tensor,
        cross_kv: list[KV | None],
        vl_mask: torch.Tensor,
        actions: torch.Tensor,
        tau: torch.Tensor,
    ) -> torch.Tensor:
        """One Euler step's velocity for actions [B, H, action_dim] at discrete time τ [B]."""
        head, cfg = self.action_head, self.cfg
        horizon = actions.shape[1]
        action_features = (
            head.action_encoder(actions, tau, cfg.embodiment_id) + head.position_embedding.weight[:horizon]
        )
        future = head.future_tokens.weight[None].expand(actions.shape[0], -1, -1)
        tokens = torch.cat([state_features, future, action_features], dim=1).to(self.compute_dtype)
        out = head.model(tokens, tau, cross_kv, vl_mask, self.attention_observer)
        return head.action_decoder(out[:, -horizon:], cfg.embodiment_id)

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
        cache_cross_kv: bool = True,
    ) -> torch.Tensor:
        """Euler integration from t=0 (noise) to t=1 (actions); [B, H, action_dim] fp32.

        GR00T has no image mask: every camera is an input, so `image_masks` is not read.
        """
        num_steps = num_steps or self.cfg.num_steps
        head = self.action_head
        token_masks = token_masks.bool()
        vl = self.embed_vl(images, tokens, token_masks)
        state_features = head.state_encoder(state[:, None, :], self.cfg.embodiment_id)
        cached = head.model.cross_kv(vl) if cache_cross_kv else None
        actions = noise.float()
        dt = 1.0 / num_steps
        for step in range(num_steps):
            # τ = int(t · buckets) with t = step / num_steps: {0, 250, 500, 750} for 4 steps.
            t_bucket = int(step / num_steps * self.cfg.num_timestep_buckets)
            tau = torch.full((actions.shape[0],), t_bucket, device=actions.device)
            cross_kv = cached if cached is not None else head.model.cross_kv(vl)
            actions = actions + dt * self.velocity(state_features, cross_kv, token_masks, actions, tau)
        return actions
