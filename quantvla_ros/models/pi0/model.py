"""π0 and π0.5: PaliGemma prefix + Gemma action expert + flow-matching sampler.

Module names reproduce openpi's PyTorch checkpoint keys, so `state_dict()` of this model is
the checkpoint (see `checkpoint.py` for the LeRobot prefix and the tied embedding).

Inference runs the prefix (images + prompt) once through the LLM and keeps each layer's
post-RoPE K/V; every Euler step then runs only the expert over the action tokens, attending
to [cached prefix K/V ; its own K/V]. The cache is read, never appended to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_ros.models.common.attention import apply_rope, attention, make_att_2d_masks, rope_cos_sin
from quantvla_ros.models.common.gemma import GemmaModel
from quantvla_ros.models.common.siglip import SiglipVisionTower
from quantvla_ros.models.family import (
    AttentionObserver,
    AttentionSite,
    attention_linears,
    decoder_linears,
    mlp_linears,
)
from quantvla_ros.models.pi0.config import PI0Config

KVCache = list[tuple[torch.Tensor, torch.Tensor]]

# openpi keeps these in fp32 inside a bf16 model (`to_bfloat16_for_selected_params`).
FP32_PARAMETERS = (
    "vision_tower.vision_model.embeddings.patch_embedding",
    "vision_tower.vision_model.embeddings.position_embedding",
    "input_layernorm",
    "post_attention_layernorm",
    "model.norm",
)


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Backbone weights in `dtype` with openpi's fp32 exceptions; the small projections stay fp32."""
    if not name.startswith("paligemma_with_expert.") or any(s in name for s in FP32_PARAMETERS):
        return torch.float32
    return dtype


def sincos_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """[sin, cos] of 2πt/period over log-spaced periods, computed in float64 as openpi does."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * t.to(torch.float64)[:, None]
    return torch.cat([angle.sin(), angle.cos()], dim=1).to(torch.float32)


class MultiModalProjector(nn.Module):
    def __init__(self, vision_width: int, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_width, width)


class PaliGemmaModel(nn.Module):
    def __init__(self, cfg: PI0Config) -> None:
        super().__init__()
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg.vision.width, cfg.llm.width)
        self.language_model = GemmaModel(cfg.llm, vocab_size=cfg.vocab_size)


class PaliGemma(nn.Module):
    def __init__(self, cfg: PI0Config) -> None:
        super().__init__()
        self.model = PaliGemmaModel(cfg)


class GemmaExpert(nn.Module):
    def __init__(self, cfg: PI0Config) -> None:
        super().__init__()
        self.model = GemmaModel(cfg.expert, vocab_size=None, adarms_cond_dim=cfg.expert.width if cfg.pi05 else None)


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, cfg: PI0Config) -> None:
        super().__init__()
        self.paligemma = PaliGemma(cfg)
        self.gemma_expert = GemmaExpert(cfg)


_LLM = "paligemma_with_expert.paligemma.model.language_model.layers"
_EXPERT = "paligemma_with_expert.gemma_expert.model.layers"


class PI0Model(nn.Module):
    FAMILY = "pi0"
    LINEAR_GROUPS = {
        "llm": decoder_linears(_LLM),
        "expert_mlp": mlp_linears(_EXPERT),
        "expert_attention": attention_linears(_EXPERT),
    }

    def __init__(self, cfg: PI0Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = torch.float32
        # Set by calibration; called on expert-only passes (the denoising steps), site = layer.
        self.attention_observer: AttentionObserver | None = None
        width = cfg.expert.width
        self.paligemma_with_expert = PaliGemmaWithExpert(cfg)
        self.action_in_proj = nn.Linear(cfg.action_dim, width)
        self.action_out_proj = nn.Linear(width, cfg.action_dim)
        if cfg.pi05:
            self.time_mlp_in = nn.Linear(width, width)
            self.time_mlp_out = nn.Linear(width, width)
        else:
            self.state_proj = nn.Linear(cfg.action_dim, width)
            self.action_time_mlp_in = nn.Linear(2 * width, width)
            self.action_time_mlp_out = nn.Linear(width, width)

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    @property
    def display_name(self) -> str:
        return "π0.5" if self.cfg.pi05 else "π0"

    def attention_sites(self) -> list[AttentionSite]:
        e = self.cfg.expert
        return [
            AttentionSite(f"{_EXPERT}.{i}.self_attn.q_proj", f"{_EXPERT}.{i}.self_attn.o_proj", e.num_heads, e.head_dim)
            for i in range(e.depth)
        ]

    @property
    def llm(self) -> GemmaModel:
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def expert(self) -> GemmaModel:
        return self.paligemma_with_expert.gemma_expert.model

    def set_dtype(self, dtype: torch.dtype) -> PI0Model:
        for name, param in self.named_parameters():
            param.data = param.data.to(parameter_dtype(name, dtype))
        self.compute_dtype = dtype
        return self

    def component_parameters(self) -> dict[str, int]:
        """Parameter count per component (works on the meta device)."""
        pali = self.paligemma_with_expert.paligemma.model

        def count(*modules: nn.Module) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        counts = {
            "vision": count(pali.vision_tower, pali.multi_modal_projector),
            "llm": count(pali.language_model),
            "expert": count(self.paligemma_with_expert.gemma_expert),
        }
        counts["action_projections"] = count(self) - sum(counts.values())
        return counts

    # ---- embedding ---------------------------------------------------------------------
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, 3, H, W] in [-1, 1] -> tokens [B, C * patches, llm width]."""
        b, c = images.shape[:2]
        pali = self.paligemma_with_expert.paligemma.model
        feats = pali.vision_tower(images.flatten(0, 1))
        tokens = pali.multi_modal_projector.linear(feats.to(pali.multi_modal_projector.linear.weight.dtype))
        return tokens.reshape(b, c * tokens.shape[1], -1).to(self.compute_dtype)

    def embed_prefix(
        self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix [images | prompt], fully bidirectional (AR mask all zero)."""
        img = self.embed_images(images)
        per_image = img.shape[1] // images.shape[1]
        img_pad = image_masks.repeat_interleave(per_image, dim=1)
        # Text embeddings carry Gemma's √width scale; image tokens do not (openpi).
        txt = self.llm.embed_tokens(tokens).to(self.compute_dtype) * math.sqrt(self.cfg.llm.width)
        embs = torch.cat([img, txt], dim=1)
        pad = torch.cat([img_pad, token_masks], dim=1)
        return embs, pad, torch.zeros_like(pad)

    def embed_suffix(
        self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Suffix [state token (π0 only) | action tokens] and π0.5's adaRMS condition."""
        b, horizon, _ = x_t.shape
        width = self.cfg.expert.width
        time_emb = sincos_time_embedding(t, width)
        action_emb = self.action_in_proj(x_t.float())
        if self.cfg.pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
            tokens = [action_emb]
            ar = [1] + [0] * (horizon - 1)
        else:
            cond = None
            fused = torch.cat([action_emb, time_emb[:, None, :].expand(b, horizon, width)], dim=2)
            action_time = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(fused)))
            tokens = [self.state_proj(state.float())[:, None, :], action_time]
            ar = [1, 1] + [0] * (horizon - 1)
        embs = torch.cat(tokens, dim=1).to(self.compute_dtype)
        pad = torch.ones(b, embs.shape[1], dtype=torch.bool, device=embs.device)
        ar_masks = torch.tensor(ar, dtype=torch.bool, device=embs.device)[None].expand(b, -1)
        return embs, pad, ar_masks, cond

    # ---- transformer -------------------------------------------------------------------
    def run_layers(
        self,
        streams: list[torch.Tensor | None],
        conds: list[torch.Tensor | None],
        positions: torch.Tensor,
        allowed: torch.Tensor,
        prefix_kv: KVCache | None = None,
        keep_kv: bool = False,
    ) -> tuple[list[torch.Tensor | None], KVCache]:
        """Joint attention over the present streams [LLM prefix, expert suffix].

        positions/allowed cover the present streams' tokens (queries); with `prefix_kv`
        the keys are [cached prefix ; present tokens].
        """
        models = (self.llm, self.expert)
        kv_out: KVCache = []
        xs = list(streams)
        cfg = self.cfg.llm
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        for i in range(cfg.depth):
            qs, ks, vs, gates = [], [], [], []
            for model, x, cond in zip(models, xs, conds, strict=True):
                if x is None:
                    continue
                q, k, v, gate = model.layers[i].project_qkv(x, cond)
                qs.append(q), ks.append(k), vs.append(v), gates.append(gate)
            q = apply_rope(torch.cat(qs, dim=2), cos, sin)
            k = apply_rope(torch.cat(ks, dim=2), cos, sin)
            v = torch.cat(vs, dim=2)
            if keep_kv:
                kv_out.append((k, v))
            if prefix_kv is not None:
                k = torch.cat([prefix_kv[i][0], k], dim=2)
                v = torch.cat([prefix_kv[i][1], v], dim=2)
            if self.attention_observer is not None and xs[0] is None:
                self.attention_observer(i, q, k, allowed)
            out = attention(q, k, v, allowed)
            start, gate_iter = 0, iter(gates)
            for s, (model, x, cond) in enumerate(zip(models, xs, conds, strict=True)):
                if x is None:
                    continue
                end = start + x.shape[1]
                xs[s] = model.layers[i].finish(x, out[:, start:end], next(gate_iter), cond)
                start = end
        outs = [None if x is None else model.norm(x, cond)[0] for model, x, cond in zip(models, xs, conds, strict=True)]
        return outs, kv_out

    def compute_prefix_kv(
        self, prefix_embs: torch.Tensor, prefix_pad: torch.Tensor, prefix_ar: torch.Tensor
    ) -> KVCache:
        positions = torch.cumsum(prefix_pad.long(), dim=1) - 1
        allowed = make_att_2d_masks(prefix_pad, prefix_ar)
        _, kv = self.run_layers([prefix_embs, None], [None, None], positions, allowed, keep_kv=True)
        return kv

    def velocity_cached(
        self, state: torch.Tensor, prefix_pad: torch.Tensor, prefix_kv: KVCache, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """One denoising step's velocity from the expert alone, reading the prefix cache."""
        suffix, suffix_pad, suffix_ar, cond = self.embed_suffix(state, x_t, t)
        b, s = suffix_pad.shape
        allowed = torch.cat(
            [prefix_pad[:, None, :].expand(b, s, prefix_pad.shape[1]), make_att_2d_masks(suffix_pad, suffix_ar)], dim=2
        )
        positions = prefix_pad.sum(dim=1, keepdim=True) + torch.cumsum(suffix_pad.long(), dim=1) - 1
        (_, out), _ = self.run_layers([None, suffix], [None, cond], positions, allowed, prefix_kv=prefix_kv)
        return self.action_out_proj(out[:, -self.cfg.action_horizon :].float())

    def velocity_full(
        self,
        prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        state: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """The same velocity from one joint pass over [prefix ; suffix] (training-time path)."""
        prefix_embs, prefix_pad, prefix_ar = prefix
        suffix, suffix_pad, suffix_ar, cond = self.embed_suffix(state, x_t, t)
        pad = torch.cat([prefix_pad, suffix_pad], dim=1)
        allowed = make_att_2d_masks(pad, torch.cat([prefix_ar, suffix_ar], dim=1))
        positions = torch.cumsum(pad.long(), dim=1) - 1
        (_, out), _ = self.run_layers([prefix_embs, suffix], [None, cond], positions, allowed)
        return self.action_out_proj(out[:, -self.cfg.action_horizon :].float())

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
        prefix = self.embed_prefix(images, image_masks, tokens, token_masks)
        kv = self.compute_prefix_kv(*prefix) if use_cache else None
        x_t = noise.float()
        b = x_t.shape[0]
        for step in range(num_steps):
            t = torch.full((b,), 1.0 - step / num_steps, dtype=torch.float32, device=x_t.device)
            if kv is not None:
                v_t = self.velocity_cached(state, prefix[1], kv, x_t, t)
            else:
                v_t = self.velocity_full(prefix, state, x_t, t)
            x_t = x_t - v_t / num_steps
        return x_t
