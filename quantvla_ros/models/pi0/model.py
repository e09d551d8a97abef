"""π0 and π0.5: PaliGemma prefix + Gemma action expert + flow-matching sampler.

Module names reproduce openpi's PyTorch checkpoint keys, so `state_dict()` of this model is
the checkpoint (see `checkpoint.py` for the LeRobot prefix and the tied embedding).

The stages (models/stages.py): embed() runs SigLIP, the projector and the prompt embedding;
prefix() runs the LLM over [images | prompt] once and keeps each layer's post-RoPE K/V in a
cache laid out [prefix ; suffix] per layer; every Euler step of denoise() then runs only the
expert over the suffix (π0: state token and action tokens, π0.5: action tokens), writing its own
K/V into the suffix part of the cache in place and attending to all of it. What the timesteps
determine (π0.5's time MLP and every adaRMS modulation, π0's time half of action_time_mlp_in)
is computed once per timestep by time_constants().

openpi trains with one joint pass over [prefix ; suffix]. The prefix never attends to the
suffix (big_vision's AR mask), so prefix() followed by velocity() computes the same velocity;
sim/train.py trains through these same stages (the cache is one tensor per layer, written before
it is read, so autograd sees no in-place change of anything it saved).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_ros.models.common.attention import apply_rope, attend, attention_bias, make_att_2d_masks, rope_cos_sin
from quantvla_ros.models.common.embeddings import action_time_constant, action_time_tokens, sincos_time_embedding
from quantvla_ros.models.common.gemma import GemmaModel
from quantvla_ros.models.common.siglip import SiglipVisionTower
from quantvla_ros.models.family import (
    AttentionSite,
    attention_linears,
    decoder_fusions,
    decoder_linears,
    mlp_linears,
)
from quantvla_ros.models.pi0.config import PI0Config
from quantvla_ros.models.stages import (
    Schedule,
    StagedModel,
    TimeConstants,
    Workspace,
    input_buffers,
    parameter_count,
)

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


@dataclass
class PI0Workspace(Workspace):
    prefix_embs: torch.Tensor  # [B, P, llm width]: [image tokens | prompt tokens]
    prefix_pad: torch.Tensor  # [B, P] bool
    # Per layer [2, B, Hkv, P + S, head_dim]: post-RoPE keys and values, prefix then suffix.
    kv: list[torch.Tensor]
    suffix_allowed: torch.Tensor  # [1, S, S] bool, the suffix's own attention pattern (fixed)
    suffix_offsets: torch.Tensor  # [S] int64, 0..S-1: suffix positions after the prefix's valid tokens
    suffix_mask: torch.Tensor  # [B, S, P + S] bool: what each suffix token attends to
    suffix_bias: torch.Tensor  # [B, 1, S, P + S]: the same as an additive bias
    suffix_cos: torch.Tensor  # [B, 1, S, head_dim] float32
    suffix_sin: torch.Tensor  # [B, 1, S, head_dim] float32


@dataclass(frozen=True)
class PI0TimeConstants(TimeConstants):
    # π0.5: [N, 2 * depth + 1, 3 * width], every expert adaRMS modulation in the order input and
    # post-attention norm of each layer, then the final norm.
    modulations: torch.Tensor | None
    # π0: [N, width], action_time_constant() of the sincos embedding.
    action_time: torch.Tensor | None


class PI0Model(StagedModel):
    FAMILY = "pi0"
    LINEAR_GROUPS = {
        "llm": decoder_linears(_LLM),
        "expert_mlp": mlp_linears(_EXPERT),
        "expert_attention": attention_linears(_EXPERT),
    }

    def __init__(self, cfg: PI0Config) -> None:
        super().__init__(cfg)
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

    parameter_dtype = staticmethod(parameter_dtype)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def display_name(self) -> str:
        return "π0.5" if self.cfg.pi05 else "π0"

    def attention_sites(self) -> list[AttentionSite]:
        e = self.cfg.expert
        return [
            AttentionSite(f"{_EXPERT}.{i}.self_attn.q_proj", f"{_EXPERT}.{i}.self_attn.o_proj", e.num_heads, e.head_dim)
            for i in range(e.depth)
        ]

    def linear_fusions(self) -> list[tuple[str, ...]]:
        cfg = self.cfg
        return decoder_fusions(_LLM, cfg.llm.depth) + decoder_fusions(_EXPERT, cfg.expert.depth)

    @property
    def llm(self) -> GemmaModel:
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def expert(self) -> GemmaModel:
        return self.paligemma_with_expert.gemma_expert.model

    def component_parameters(self) -> dict[str, int]:
        """Parameter count per component (works on the meta device)."""
        pali = self.paligemma_with_expert.paligemma.model
        counts = {
            "vision": parameter_count(pali.vision_tower, pali.multi_modal_projector),
            "llm": parameter_count(pali.language_model),
            "expert": parameter_count(self.paligemma_with_expert.gemma_expert),
        }
        counts["action_projections"] = parameter_count(self) - sum(counts.values())
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix embeddings [images | prompt] and their padding mask; the prefix is bidirectional."""
        img = self.embed_images(images)
        per_image = img.shape[1] // images.shape[1]
        img_pad = image_masks.repeat_interleave(per_image, dim=1)
        # Text embeddings carry Gemma's √width scale; image tokens do not (openpi).
        txt = self.llm.embed_tokens(tokens).to(self.compute_dtype) * math.sqrt(self.cfg.llm.width)
        return torch.cat([img, txt], dim=1), torch.cat([img_pad, token_masks], dim=1)

    # ---- stages ------------------------------------------------------------------------
    def workspace(self, image_shape: tuple[int, ...], prompt_len: int) -> PI0Workspace:
        cfg, dev, dtype = self.cfg, self.device, self.compute_dtype
        b, c = image_shape[:2]
        llm, horizon = cfg.llm, cfg.action_horizon
        p = c * cfg.vision.num_patches + prompt_len
        # π0: [state token | action tokens], the state token attending only to itself and the
        # prefix; π0.5: action tokens only. The actions attend to each other bidirectionally.
        ar = [1] + [0] * (horizon - 1) if cfg.pi05 else [1, 1] + [0] * (horizon - 1)
        s = len(ar)
        suffix_ar = torch.tensor([ar], dtype=torch.bool, device=dev)
        return PI0Workspace(
            **input_buffers(cfg, image_shape, prompt_len, dev),
            prefix_embs=torch.zeros(b, p, llm.width, dtype=dtype, device=dev),
            prefix_pad=torch.zeros(b, p, dtype=torch.bool, device=dev),
            kv=[
                torch.zeros(2, b, llm.num_kv_heads, p + s, llm.head_dim, dtype=dtype, device=dev)
                for _ in range(llm.depth)
            ],
            suffix_allowed=make_att_2d_masks(torch.ones_like(suffix_ar), suffix_ar),
            suffix_offsets=torch.arange(s, device=dev),
            suffix_mask=torch.zeros(b, s, p + s, dtype=torch.bool, device=dev),
            suffix_bias=torch.zeros(b, 1, s, p + s, dtype=dtype, device=dev),
            suffix_cos=torch.zeros(b, 1, s, llm.head_dim, device=dev),
            suffix_sin=torch.zeros(b, 1, s, llm.head_dim, device=dev),
        )

    def embed(self, ws: PI0Workspace) -> None:
        embs, pad = self.embed_prefix(ws.images, ws.image_masks, ws.tokens, ws.token_masks)
        ws.prefix_embs.copy_(embs)
        ws.prefix_pad.copy_(pad)

    def prefix(self, ws: PI0Workspace) -> None:
        """The LLM over the prefix, filling the prefix part of every layer's K/V cache; then the
        suffix's attention mask and RoPE tables, which depend on the prefix's padding only."""
        llm, dtype = self.cfg.llm, self.compute_dtype
        pad = ws.prefix_pad
        b, p = pad.shape
        cos, sin = rope_cos_sin(torch.cumsum(pad.long(), dim=1) - 1, llm.head_dim, llm.rope_theta)
        # The prefix is bidirectional; one bias serves every layer.
        bias = attention_bias(make_att_2d_masks(pad, torch.zeros_like(pad)), dtype)
        x = ws.prefix_embs
        layers = self.llm.layers
        for i, layer in enumerate(layers):
            q, k, v, _ = layer.project_qkv(x)
            k = apply_rope(k, cos, sin)
            ws.kv[i][0, :, :, :p].copy_(k)
            ws.kv[i][1, :, :, :p].copy_(v)
            # The expert reads only the K/V of the last layer, never its output.
            if i + 1 < len(layers):
                x = layer.finish(x, attend(apply_rope(q, cos, sin), k, v, bias), None)
        s = ws.suffix_allowed.shape[1]
        ws.suffix_mask.copy_(torch.cat([pad[:, None, :].expand(b, s, p), ws.suffix_allowed.expand(b, s, s)], dim=2))
        ws.suffix_bias.copy_(attention_bias(ws.suffix_mask, dtype))
        cos, sin = rope_cos_sin(pad.sum(dim=1, keepdim=True) + ws.suffix_offsets, llm.head_dim, llm.rope_theta)
        ws.suffix_cos.copy_(cos)
        ws.suffix_sin.copy_(sin)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """t = 1, 1 - 1/n, ..., 1/n: the flow runs from noise (t = 1) to actions (t = 0)."""
        return torch.tensor([1.0 - step / num_steps for step in range(num_steps)], device=self.device)

    def time_constants(self, t: torch.Tensor) -> PI0TimeConstants:
        time_emb = sincos_time_embedding(t, self.cfg.expert.width, self.cfg.min_period, self.cfg.max_period)
        if not self.cfg.pi05:
            return PI0TimeConstants(None, action_time_constant(self.action_time_mlp_in, time_emb))
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
        expert = self.expert
        norms = [norm for layer in expert.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        return PI0TimeConstants(torch.stack([norm.modulation(cond) for norm in [*norms, expert.norm]], dim=1), None)

    def state_token(self, ws: PI0Workspace) -> torch.Tensor | None:
        """π0's state token [B, 1, width], the same on every step; π0.5 reads the state from its prompt."""
        return None if self.cfg.pi05 else self.state_proj(ws.state)[:, None, :]

    def denoise(self, ws: PI0Workspace, schedule: Schedule) -> None:
        """Euler steps from t = 1 (noise) to t = 0 (actions)."""
        n = schedule.num_steps
        x_t = ws.actions
        x_t.copy_(ws.noise)
        state_token = self.state_token(ws)
        for step in range(n):
            x_t.sub_(self.velocity(ws, x_t, schedule.constants.row(step), state_token) / n)

    def velocity(
        self, ws: PI0Workspace, x_t: torch.Tensor, time: PI0TimeConstants, state_token: torch.Tensor | None
    ) -> torch.Tensor:
        """The flow's velocity [B, horizon, action_dim] at actions x_t, from the expert alone over
        the prefix cache; `time` holds one row of time_constants() (or one per sample)."""
        action_emb = self.action_in_proj(x_t.float())
        if self.cfg.pi05:
            x = action_emb.to(self.compute_dtype)
        else:
            mlp_in, mlp_out = self.action_time_mlp_in, self.action_time_mlp_out
            action_time = action_time_tokens(mlp_in, mlp_out, action_emb, time.action_time)
            x = torch.cat([state_token, action_time], dim=1).to(self.compute_dtype)
        out = self.expert_stream(ws, x, time.modulations)
        return self.action_out_proj(out[:, -self.cfg.action_horizon :].float())

    def expert_stream(self, ws: PI0Workspace, x: torch.Tensor, modulations: torch.Tensor | None) -> torch.Tensor:
        """The expert over suffix tokens x [B, S, width], attending to [prefix cache ; its own K/V]
        under ws.suffix_mask, at ws.suffix_cos/sin; its K/V go into the suffix part of the cache.
        Returns the final norm's output. modulations: π0.5's adaRMS row(s), None for π0."""

        def modulation(j: int) -> torch.Tensor | None:
            return None if modulations is None else modulations[:, j]

        p = ws.prefix_pad.shape[1]
        cos, sin = ws.suffix_cos, ws.suffix_sin
        for i, layer in enumerate(self.expert.layers):
            q, k, v, gate = layer.project_qkv(x, modulation(2 * i))
            cache = ws.kv[i]
            cache[0, :, :, p:].copy_(apply_rope(k, cos, sin))
            cache[1, :, :, p:].copy_(v)
            q = apply_rope(q, cos, sin)
            if self.attention_observer is not None:
                self.attention_observer(i, q, cache[0], ws.suffix_mask, x.shape[1])
            x = layer.finish(x, attend(q, cache[0], cache[1], ws.suffix_bias), gate, modulation(2 * i + 1))
        return self.expert.norm(x, modulation(-1))[0]
