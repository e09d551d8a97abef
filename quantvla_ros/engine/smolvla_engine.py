"""An inference engine for SmolVLA: precomputed timestep schedule, static buffers, CUDA graphs.

`SmolVLAEngine(model).sample_actions(...)` computes what `SmolVLAModel.sample_actions` computes,
to float rounding, with the model's own modules (float or QuantLinear):

- Everything the fixed timesteps 1, 1 - 1/n, ... determine is computed once per step count: the
  sincos time embedding and, where action_time_mlp_in is a plain Linear, the time half of it
  (with its bias). The steps then run only the action half.
- For one input shape (batch, cameras, image size, prompt length) every tensor that crosses a
  stage lives in a static buffer allocated once: inputs, the prefix embeddings, one K/V cache
  laid out [prefix ; suffix] per self-attention expert layer (each step writes its suffix K/V
  in place instead of concatenating onto the prefix), the prefix K/V re-projected by each
  cross-attention expert layer's k_proj/v_proj (step-invariant, so once per inference), both
  attention biases and the RoPE tables. A new shape reallocates them and drops the graphs.
- On CUDA each stage is captured once as a CUDA graph and replayed: the vision stage, the prefix
  pass and all Euler steps of the denoising loop (one graph per step count). On the CPU, or with
  cuda_graphs=False, the same code runs eagerly. compile=True also wraps the stages in
  torch.compile.

The stages are public so a benchmark can time them: embed() (SigLIP, connector, prompt and
state embedding: SmolVLA's state is the prefix's last token, so embed() takes it and denoise()
does not), prefix() (the text model pass that fills the caches), denoise() (the action expert).
Build the engine after quantizing or loading: the schedule and the graphs hold the model's
weights as they were then. The model's attention_observer is not called (calibration runs the
plain model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_ros.engine.staged import StagedEngine
from quantvla_ros.models.common.attention import attend, attention_bias, make_att_2d_masks
from quantvla_ros.models.pi0.model import sincos_time_embedding
from quantvla_ros.models.smolvla.model import SmolVLAModel


@dataclass(frozen=True)
class Schedule:
    """What the timesteps of an n-step Euler integration determine."""

    num_steps: int
    # [n, width]: the time half of action_time_mlp_in with its bias where that layer is a plain
    # Linear, otherwise the sincos embedding itself.
    time: torch.Tensor


@dataclass(frozen=True)
class StaticBuffers:
    """Every tensor that crosses a stage, for one input shape; CUDA graphs hold their addresses."""

    images: torch.Tensor  # [B, C, 3, H, W] float32
    image_masks: torch.Tensor  # [B, C] bool
    tokens: torch.Tensor  # [B, L] int64
    token_masks: torch.Tensor  # [B, L] bool
    state: torch.Tensor  # [B, max_state_dim] float32
    noise: torch.Tensor  # [B, horizon, action_dim] float32
    actions: torch.Tensor  # [B, horizon, action_dim] float32: x_t during the steps, the result after
    prefix_embs: torch.Tensor  # [B, P, text width]: [images | prompt | state]
    prefix_pad: torch.Tensor  # [B, P] bool
    prefix_ar: torch.Tensor  # [B, P] bool: only the state token opens a new attention block (fixed)
    self_kv: torch.Tensor  # [self layers, 2, B, Hkv, P + S, head_dim]: post-RoPE prefix K/V, then the suffix's
    cross_kv: torch.Tensor  # [cross layers, 2, B, Hkv, P, head_dim]: the prefix K/V through the layer's k/v_proj
    suffix_allowed: torch.Tensor  # [1, S, S] bool: the action tokens are causal among themselves (fixed)
    suffix_offsets: torch.Tensor  # [S] int64, 0..S-1: suffix positions after the prefix's valid tokens
    self_bias: torch.Tensor  # [B, 1, S, P + S]
    cross_bias: torch.Tensor  # [B, 1, S, P]: the prefix's padding
    self_cos: torch.Tensor  # [B, 1, S, head_dim] float32
    self_sin: torch.Tensor  # [B, 1, S, head_dim] float32
    cross_cos: torch.Tensor  # [1, 1, S, head_dim] float32: cross queries restart at position 0 (fixed)
    cross_sin: torch.Tensor  # [1, 1, S, head_dim] float32


class SmolVLAEngine(StagedEngine):
    """A drop-in for SmolVLAModel.sample_actions over one loaded model (see the module docstring)."""

    def __init__(self, model: SmolVLAModel, cuda_graphs: bool = True, compile: bool = False) -> None:
        layers = range(model.cfg.expert.depth)
        # expert layer index -> its slot in cross_kv or in self_kv
        self._cross_slot = {i: slot for slot, i in enumerate(i for i in layers if model.cfg.is_cross_layer(i))}
        self._self_slot = {i: slot for slot, i in enumerate(i for i in layers if not model.cfg.is_cross_layer(i))}
        # A quantized action_time_mlp_in scales each fused row as a whole, so only a float one splits.
        self._split_time = type(model.action_time_mlp_in) is nn.Linear
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
        """Euler integration of the flow from t=1 (noise) to t=0 (actions); [B, H, action_dim] fp32."""
        self.embed(images, image_masks, tokens, token_masks, state)
        self.prefix()
        return self.denoise(noise, num_steps)

    @torch.no_grad()
    def embed(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        state: torch.Tensor,
    ) -> None:
        """Vision stage: SigLIP and connector over the cameras, the prompt and state embeddings, into the prefix."""
        buf = self._buffers_for(images, image_masks, tokens, token_masks)
        if tuple(state.shape) != tuple(buf.state.shape):
            raise ValueError(f"state must be {list(buf.state.shape)} for this batch, got shape {tuple(state.shape)}.")
        buf.images.copy_(images)
        buf.image_masks.copy_(image_masks)
        buf.tokens.copy_(tokens)
        buf.token_masks.copy_(token_masks)
        buf.state.copy_(state)
        self.graphs.run("embed", self._embed_stage)

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
        """All Euler steps of the action expert over the cached prefix; [B, H, action_dim] fp32."""
        buf = self._require_buffers("denoise")
        if tuple(noise.shape) != tuple(buf.noise.shape):
            raise ValueError(f"noise must be {list(buf.noise.shape)} for this batch, got shape {tuple(noise.shape)}.")
        buf.noise.copy_(noise)
        schedule = self.schedule(num_steps or self.cfg.num_steps)
        return self._run_denoise(schedule)

    # ---- setup -----------------------------------------------------------------------
    def _compute_schedule(self, n: int) -> Schedule:
        cfg, width = self.cfg, self.cfg.expert.width
        # The same float32 values the plain sampler builds with torch.full(1.0 - step / n).
        t = torch.tensor([1.0 - step / n for step in range(n)], dtype=torch.float32, device=self.device)
        time_emb = sincos_time_embedding(t, width, cfg.min_period, cfg.max_period)
        if self._split_time:
            mlp_in = self.model.action_time_mlp_in
            time_emb = F.linear(time_emb, mlp_in.weight[:, width:], mlp_in.bias)
        return Schedule(n, time_emb)

    def _allocate(self, image_shape: tuple[int, ...], prompt_len: int) -> StaticBuffers:
        cfg, dev, dtype = self.cfg, self.device, self.dtype
        b, c = image_shape[:2]
        text, s = cfg.text, cfg.action_horizon
        p = c * cfg.vlm.tokens_per_image + prompt_len + 1
        heads, head_dim = text.num_kv_heads, text.head_dim
        prefix_ar = torch.zeros(b, p, dtype=torch.bool, device=dev)
        prefix_ar[:, -1] = True
        suffix_ar = torch.ones(1, s, dtype=torch.bool, device=dev)
        cross_cos, cross_sin = self.model.rope(torch.arange(s, device=dev)[None])
        actions = torch.zeros(b, s, cfg.action_dim, device=dev)
        return StaticBuffers(
            images=torch.zeros(image_shape, device=dev),
            image_masks=torch.zeros(b, c, dtype=torch.bool, device=dev),
            tokens=torch.zeros(b, prompt_len, dtype=torch.int64, device=dev),
            token_masks=torch.zeros(b, prompt_len, dtype=torch.bool, device=dev),
            state=torch.zeros(b, cfg.max_state_dim, device=dev),
            noise=torch.zeros_like(actions),
            actions=actions,
            prefix_embs=torch.zeros(b, p, text.width, dtype=dtype, device=dev),
            prefix_pad=torch.zeros(b, p, dtype=torch.bool, device=dev),
            prefix_ar=prefix_ar,
            self_kv=torch.zeros(len(self._self_slot), 2, b, heads, p + s, head_dim, dtype=dtype, device=dev),
            cross_kv=torch.zeros(len(self._cross_slot), 2, b, heads, p, head_dim, dtype=dtype, device=dev),
            suffix_allowed=make_att_2d_masks(suffix_ar, suffix_ar),
            suffix_offsets=torch.arange(s, device=dev),
            self_bias=torch.zeros(b, 1, s, p + s, dtype=dtype, device=dev),
            cross_bias=torch.zeros(b, 1, s, p, dtype=dtype, device=dev),
            self_cos=torch.zeros(b, 1, s, head_dim, device=dev),
            self_sin=torch.zeros(b, 1, s, head_dim, device=dev),
            cross_cos=cross_cos,
            cross_sin=cross_sin,
        )

    # ---- stages: static tensors in, static tensors out, capture-safe -----------------
    def _embed_stage(self) -> None:
        buf = self.buffers
        embs, pad, _ = self.model.embed_prefix(buf.images, buf.image_masks, buf.tokens, buf.token_masks, buf.state)
        buf.prefix_embs.copy_(embs)
        buf.prefix_pad.copy_(pad)

    def _prefix_stage(self) -> None:
        buf, m = self.buffers, self.model
        pad = buf.prefix_pad
        b, p = pad.shape
        cos, sin = m.rope(torch.cumsum(pad.long(), dim=1) - 1)
        bias = attention_bias(make_att_2d_masks(pad, buf.prefix_ar), self.dtype)
        x = buf.prefix_embs
        layers = m.llm.layers
        for i, (layer, expert_layer) in enumerate(zip(layers, m.expert.layers, strict=True)):
            q, k, v = layer.query_key_value(x, cos, sin)
            if i in self._cross_slot:
                cross_k, cross_v = expert_layer.cross_key_value(k, v)
                cache = buf.cross_kv[self._cross_slot[i]]
                cache[0].copy_(cross_k)
                cache[1].copy_(cross_v)
            else:
                cache = buf.self_kv[self._self_slot[i], :, :, :, :p]
                cache[0].copy_(k)
                cache[1].copy_(v)
            # The expert reads only the K/V of the last layer, never its output.
            if i + 1 < len(layers):
                x = layer.finish(x, attend(q, k, v, bias))
        s = buf.suffix_allowed.shape[1]
        sees_prefix = pad[:, None, :].expand(b, s, p)
        buf.cross_bias.copy_(attention_bias(sees_prefix, self.dtype))
        buf.self_bias.copy_(
            attention_bias(torch.cat([sees_prefix, buf.suffix_allowed.expand(b, s, s)], dim=2), self.dtype)
        )
        cos, sin = m.rope(pad.sum(dim=1, keepdim=True) + buf.suffix_offsets)
        buf.self_cos.copy_(cos)
        buf.self_sin.copy_(sin)

    def _denoise_stage(self, schedule: Schedule) -> None:
        buf, n = self.buffers, schedule.num_steps
        x_t = buf.actions
        x_t.copy_(buf.noise)
        for step in range(n):
            x_t.sub_(self._velocity(x_t, step, schedule) / n)

    def _velocity(self, x_t: torch.Tensor, step: int, schedule: Schedule) -> torch.Tensor:
        buf, m = self.buffers, self.model
        x = self._suffix(x_t, step, schedule)
        p = buf.cross_bias.shape[-1]
        for i, layer in enumerate(m.expert.layers):
            if i in self._cross_slot:
                kv = buf.cross_kv[self._cross_slot[i]]
                out = attend(layer.query(x, buf.cross_cos, buf.cross_sin), kv[0], kv[1], buf.cross_bias)
            else:
                kv = buf.self_kv[self._self_slot[i]]
                q, k, v = layer.query_key_value(x, buf.self_cos, buf.self_sin)
                kv[0, :, :, p:].copy_(k)
                kv[1, :, :, p:].copy_(v)
                out = attend(q, kv[0], kv[1], buf.self_bias)
            x = layer.finish(x, out)
        return m.action_out_proj(m.expert.norm(x)[:, -self.cfg.action_horizon :].float())

    def _suffix(self, x_t: torch.Tensor, step: int, schedule: Schedule) -> torch.Tensor:
        m, width = self.model, self.cfg.expert.width
        action_emb = m.action_in_proj(x_t)
        time = schedule.time[step]
        if self._split_time:
            fused = F.linear(action_emb, m.action_time_mlp_in.weight[:, :width]) + time
        else:
            fused = m.action_time_mlp_in(torch.cat([action_emb, time.expand_as(action_emb)], dim=2))
        return m.action_time_mlp_out(F.silu(fused)).to(self.dtype)
