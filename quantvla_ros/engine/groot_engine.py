"""An inference engine for GR00T N1.5: precomputed timestep schedule, static buffers, CUDA graphs.

`GR00TEngine(model).sample_actions(...)` computes what `GR00TN15Model.sample_actions` computes,
to float rounding, with the model's own modules (float or QuantLinear):

- Everything the fixed timesteps τ = int(k/n · 1000) determine is computed once per step count:
  the timestep encoder's embedding, every DiT block's AdaLayerNorm (scale, shift), the output
  layer's (shift, scale), and the action encoder's sincos(τ) through the time half of its W2
  (with W2's bias). The steps then run none of these.
- For one input shape (batch, cameras, image size, prompt length) every tensor that crosses a
  stage lives in a static buffer allocated once: inputs, the merged prompt embeddings, the VL
  tokens' cross-attention K/V of every cross block, the cross-attention bias, and the DiT's
  token sequence, whose state and future tokens are written once per inference and whose action
  tokens each step rewrites in place. A new shape reallocates them and drops the graphs.
- On CUDA each stage is captured once as a CUDA graph and replayed: the vision stage, the prefix
  (Qwen3, vlln, VL self-attention, cross K/V) and all Euler steps of the denoising loop (one
  graph per step count). On the CPU, or with cuda_graphs=False, the same code runs eagerly.
  compile=True also wraps the stages in torch.compile.

The stages are public so a benchmark can time them: embed() (SigLIP-2, mlp1, prompt embedding
with the image features merged in), prefix(), denoise(). Build the engine after quantizing or
loading: the schedule and the graphs hold the model's weights as they were then. The model's
attention_observer is not called (calibration runs the plain model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantvla_ros.engine.staged import StagedEngine
from quantvla_ros.models.common.attention import attention_bias
from quantvla_ros.models.groot.model import Attention, DiT, GR00TN15Model, action_time_encoding


@dataclass(frozen=True)
class Schedule:
    """What the timesteps of an n-step Euler integration determine (all float32)."""

    num_steps: int
    modulations: torch.Tensor  # [n, depth, 2 * width]: every DiT block's norm1 (scale, shift) per step
    output: torch.Tensor  # [n, 2 * width]: proj_out_1's (shift, scale) per step
    action_time: torch.Tensor  # [n, width]: sincos(τ) through the time half of action_encoder.W2, plus its bias


@dataclass(frozen=True)
class StaticBuffers:
    """Every tensor that crosses a stage, for one input shape; CUDA graphs hold their addresses."""

    images: torch.Tensor  # [B, C, 3, H, W] float32
    tokens: torch.Tensor  # [B, L] int64
    token_masks: torch.Tensor  # [B, L] bool
    state: torch.Tensor  # [B, max_state_dim] float32
    noise: torch.Tensor  # [B, horizon, action_dim] float32
    actions: torch.Tensor  # [B, horizon, action_dim] float32: x_t during the steps, the result after
    embeds: torch.Tensor  # [B, L, llm width]: prompt embeddings with the image features in their slots
    cross_kv: torch.Tensor  # [cross blocks, 2, B, heads, L, head_dim]: the VL tokens' K/V per cross block
    cross_bias: torch.Tensor  # [B, 1, T, L]: DiT tokens to VL tokens, padding masked
    dit_tokens: torch.Tensor  # [B, T, width]: state token, future tokens, action tokens


def _attend(
    attn: Attention, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Attention.forward with the key bias built once per inference instead of once per block and step."""
    b, t = x.shape[:2]
    out = F.scaled_dot_product_attention(attn.heads(attn.to_q(x)), k, v, attn_mask=bias)
    return attn.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GR00TEngine(StagedEngine):
    """A drop-in for GR00TN15Model.sample_actions over one loaded model (see the module docstring)."""

    def __init__(self, model: GR00TN15Model, cuda_graphs: bool = True, compile: bool = False) -> None:
        cross = [i for i in range(model.cfg.dit.depth) if DiT.is_cross(i)]
        self._cross_slot = {block: slot for slot, block in enumerate(cross)}
        super().__init__(model, cuda_graphs, compile)

    # ---- public API ------------------------------------------------------------------
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
    ) -> torch.Tensor:
        """Euler integration from t=0 (noise) to t=1 (actions); [B, H, action_dim] fp32.

        GR00T has no image mask: every camera is an input, so `image_masks` is not read.
        """
        self.embed(images, image_masks, tokens, token_masks)
        self.prefix()
        return self.denoise(state, noise, num_steps)

    @torch.no_grad()
    def embed(
        self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_masks: torch.Tensor
    ) -> None:
        """Vision stage: SigLIP-2 and mlp1 over the cameras, merged into the prompt embedding."""
        buf = self._buffers_for(images, image_masks, tokens, token_masks)
        buf.images.copy_(images)
        buf.tokens.copy_(tokens)
        buf.token_masks.copy_(token_masks)
        self.graphs.run("embed", self._embed_stage)

    @torch.no_grad()
    def denoise(self, state: torch.Tensor, noise: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
        """All Euler steps of the DiT over the cached VL tokens; [B, H, action_dim] fp32."""
        buf = self._require_buffers("denoise")
        if tuple(noise.shape) != tuple(buf.noise.shape):
            raise ValueError(f"noise must be {list(buf.noise.shape)} for this batch, got shape {tuple(noise.shape)}.")
        if tuple(state.shape) != tuple(buf.state.shape):
            raise ValueError(f"state must be {list(buf.state.shape)} for this batch, got shape {tuple(state.shape)}.")
        buf.state.copy_(state)
        buf.noise.copy_(noise)
        schedule = self.schedule(num_steps or self.cfg.num_steps)
        return self._run_denoise(schedule)

    # ---- setup -----------------------------------------------------------------------
    def _compute_schedule(self, n: int) -> Schedule:
        head = self.model.action_head
        dit, encoder = head.model, head.action_encoder
        # The plain sampler's own expression, so every τ is the same integer bucket.
        buckets = [int(step / n * self.cfg.num_timestep_buckets) for step in range(n)]
        tau = torch.tensor(buckets, device=self.device)
        temb = dit.timestep_encoder(tau)
        modulations = torch.stack([block.norm1.modulation(temb) for block in dit.transformer_blocks], dim=1)
        # W2 sees [W1(a) ; sincos(τ)] and is linear (a float CategorySpecificLinear, which no layout
        # quantizes), so its time half and bias fold into one row per step.
        e, width = self.cfg.embodiment_id, encoder.width
        action_time = action_time_encoding(tau, width) @ encoder.W2.W[e, width:] + encoder.W2.b[e]
        return Schedule(n, modulations, dit.output_modulation(temb), action_time)

    def _buffers_for(
        self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_masks: torch.Tensor
    ) -> StaticBuffers:
        buf = super()._buffers_for(images, image_masks, tokens, token_masks)
        # The merge in the vision stage gathers without counting, so the count is checked here, before it.
        cameras = images.shape[1]
        per_row = (tokens == self.cfg.image_token_id).sum(dim=1)
        want = cameras * self.cfg.tokens_per_image
        if bool((per_row != want).any()):
            raise ValueError(
                f"Each prompt needs {want} <IMG_CONTEXT> tokens for {cameras} image(s), got {per_row.tolist()}; "
                "build the prompt with this checkpoint's processor."
            )
        return buf

    def _allocate(self, image_shape: tuple[int, ...], prompt_len: int) -> StaticBuffers:
        cfg, dev, dtype = self.cfg, self.device, self.dtype
        b, dit = image_shape[0], cfg.dit
        t = 1 + cfg.num_target_vision_tokens + cfg.action_horizon
        actions = torch.zeros(b, cfg.action_horizon, cfg.action_dim, device=dev)
        kv_shape = (len(self._cross_slot), 2, b, dit.num_heads, prompt_len, dit.head_dim)
        return StaticBuffers(
            images=torch.zeros(image_shape, device=dev),
            tokens=torch.zeros(b, prompt_len, dtype=torch.int64, device=dev),
            token_masks=torch.zeros(b, prompt_len, dtype=torch.bool, device=dev),
            state=torch.zeros(b, cfg.max_state_dim, device=dev),
            noise=torch.zeros_like(actions),
            actions=actions,
            embeds=torch.zeros(b, prompt_len, cfg.llm.width, dtype=dtype, device=dev),
            cross_kv=torch.zeros(kv_shape, dtype=dtype, device=dev),
            cross_bias=torch.zeros(b, 1, t, prompt_len, dtype=dtype, device=dev),
            dit_tokens=torch.zeros(b, t, cfg.input_embedding_dim, dtype=dtype, device=dev),
        )

    # ---- stages: static tensors in, static tensors out, capture-safe -----------------
    def _embed_stage(self) -> None:
        buf, eagle = self.buffers, self.model.backbone.eagle_model
        vit = eagle.mlp1(eagle.vision_model(buf.images.to(self.dtype).flatten(0, 1)))
        embeds = eagle.language_model.model.embed_tokens(buf.tokens)
        b, _, width = embeds.shape
        # The k-th placeholder of a row takes the row's k-th image feature, as masked_scatter orders
        # them; a gather by running count does that without a host-side count.
        slots = buf.tokens == self.cfg.image_token_id
        index = (slots.cumsum(dim=1) - 1).clamp(min=0)
        features = vit.to(embeds.dtype).reshape(b, -1, width).gather(1, index[..., None].expand(-1, -1, width))
        buf.embeds.copy_(torch.where(slots[..., None], features, embeds))

    def _prefix_stage(self) -> None:
        buf, head = self.buffers, self.model.action_head
        mask = buf.token_masks
        features = self.model.backbone.eagle_model.language_model.model(buf.embeds, mask)
        vl = head.vl_self_attention(head.vlln(features), mask)
        for block, slot in self._cross_slot.items():
            k, v = head.model.transformer_blocks[block].attn1.project_kv(vl)
            buf.cross_kv[slot, 0].copy_(k)
            buf.cross_kv[slot, 1].copy_(v)
        b, t, length = buf.cross_bias.shape[0], buf.cross_bias.shape[2], mask.shape[1]
        buf.cross_bias.copy_(attention_bias(mask[:, None, :].expand(b, t, length), self.dtype))

    def _denoise_stage(self, schedule: Schedule) -> None:
        buf, head, cfg = self.buffers, self.model.action_head, self.cfg
        horizon = cfg.action_horizon
        # The state token and the future tokens are the same on every step.
        buf.dit_tokens[:, :1].copy_(head.state_encoder(buf.state[:, None, :], cfg.embodiment_id))
        buf.dit_tokens[:, 1:-horizon].copy_(head.future_tokens.weight)
        x_t = buf.actions
        x_t.copy_(buf.noise)
        dt = 1.0 / schedule.num_steps
        for step in range(schedule.num_steps):
            x_t.add_(self._velocity(x_t, step, schedule), alpha=dt)

    def _velocity(self, x_t: torch.Tensor, step: int, schedule: Schedule) -> torch.Tensor:
        buf, head, cfg = self.buffers, self.model.action_head, self.cfg
        dit, encoder, e = head.model, head.action_encoder, cfg.embodiment_id
        horizon = cfg.action_horizon
        fused = encoder.W1(x_t, e) @ encoder.W2.W[e, : encoder.width] + schedule.action_time[step]
        action_tokens = encoder.W3(F.silu(fused), e) + head.position_embedding.weight[:horizon]
        buf.dit_tokens[:, -horizon:].copy_(action_tokens)
        x = buf.dit_tokens
        for i, block in enumerate(dit.transformer_blocks):
            h = block.norm1.modulate(x, schedule.modulations[step, i, None])
            slot = self._cross_slot.get(i)
            if slot is None:
                out = _attend(block.attn1, h, *block.attn1.project_kv(h), None)
            else:
                out = _attend(block.attn1, h, buf.cross_kv[slot, 0], buf.cross_kv[slot, 1], buf.cross_bias)
            x = x + out
            x = x + block.ff(block.norm3(x))
        # The output layer is per token and only the action tokens are read.
        out = dit.modulated_output(x[:, -horizon:], schedule.output[step, None])
        return head.action_decoder(out, e)
