"""An inference engine for π0 / π0.5: precomputed timestep schedule, static buffers, CUDA graphs.

`PI0Engine(model).sample_actions(...)` computes what `PI0Model.sample_actions` computes, to
float rounding, with the model's own modules (float or QuantLinear):

- Everything the fixed timesteps 1, 1 - 1/n, ... determine is computed once per step count:
  π0.5's time MLP and every expert adaRMS (scale, shift, gate); π0's sincos embedding and,
  where action_time_mlp_in is a plain Linear, the time half of it. The steps then run neither.
- For one input shape (batch, cameras, image size, prompt length) every tensor that crosses a
  stage lives in a static buffer allocated once: inputs, prefix embeddings, one K/V cache laid
  out [prefix ; suffix] per layer (each step writes its suffix K/V in place instead of
  concatenating onto the prefix), the suffix attention bias and RoPE tables. A new shape
  reallocates them and drops the graphs.
- On CUDA each stage is captured once as a CUDA graph and replayed: the vision stage, the prefix
  pass and all Euler steps of the denoising loop (one graph per step count). On the CPU, or with
  cuda_graphs=False, the same code runs eagerly. compile=True also wraps the stages in
  torch.compile.

The stages are public so a benchmark can time them: embed() (SigLIP, projector, prompt
embedding), prefix() (the LLM pass that fills the K/V cache), denoise() (the action expert).
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
from quantvla_ros.models.common.attention import apply_rope, attend, attention_bias, make_att_2d_masks, rope_cos_sin
from quantvla_ros.models.common.gemma import AdaRMSNorm, RMSNorm, gated_residual
from quantvla_ros.models.pi0.model import PI0Model, sincos_time_embedding


@dataclass(frozen=True)
class Schedule:
    """What the timesteps of an n-step Euler integration determine."""

    num_steps: int
    # π0.5: [n, 2 * depth + 1, 3 * width], the modulation of every expert adaRMS per step, in the
    # order input and post-attention norm of each layer, then the final norm.
    modulations: torch.Tensor | None
    # π0: [n, width], the time half of action_time_mlp_in with its bias where that layer is a plain
    # Linear, otherwise the sincos embedding itself.
    time: torch.Tensor | None


@dataclass(frozen=True)
class StaticBuffers:
    """Every tensor that crosses a stage, for one input shape; CUDA graphs hold their addresses."""

    images: torch.Tensor  # [B, C, 3, H, W] float32
    image_masks: torch.Tensor  # [B, C] bool
    tokens: torch.Tensor  # [B, L] int64
    token_masks: torch.Tensor  # [B, L] bool
    state: torch.Tensor | None  # [B, state width] float32 (π0 only)
    noise: torch.Tensor  # [B, horizon, action_dim] float32
    actions: torch.Tensor  # [B, horizon, action_dim] float32: x_t during the steps, the result after
    prefix_embs: torch.Tensor  # [B, P, llm width]
    prefix_pad: torch.Tensor  # [B, P] bool
    kv: torch.Tensor  # [depth, 2, B, Hkv, P + S, head_dim]: post-RoPE keys and values, prefix then suffix
    suffix_allowed: torch.Tensor  # [1, S, S] bool, the suffix's own attention pattern (fixed)
    suffix_offsets: torch.Tensor  # [S] int64, 0..S-1: suffix positions after the prefix's valid tokens
    suffix_bias: torch.Tensor  # [B, 1, S, P + S]
    suffix_cos: torch.Tensor  # [B, 1, S, head_dim] float32
    suffix_sin: torch.Tensor  # [B, 1, S, head_dim] float32


def _norm(
    norm: RMSNorm | AdaRMSNorm, x: torch.Tensor, modulation: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return norm(x) if modulation is None else norm.modulate(x, modulation)


class PI0Engine(StagedEngine):
    """A drop-in for PI0Model.sample_actions over one loaded model (see the module docstring)."""

    def __init__(self, model: PI0Model, cuda_graphs: bool = True, compile: bool = False) -> None:
        # A quantized action_time_mlp_in scales each fused row as a whole, so only a float one splits.
        self._split_time = not model.cfg.pi05 and type(model.action_time_mlp_in) is nn.Linear
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
        self.embed(images, image_masks, tokens, token_masks)
        self.prefix()
        return self.denoise(state, noise, num_steps)

    @torch.no_grad()
    def embed(
        self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_masks: torch.Tensor
    ) -> None:
        """Vision stage: SigLIP and projector over the cameras, and the prompt embedding, into the static prefix."""
        buf = self._buffers_for(images, image_masks, tokens, token_masks)
        buf.images.copy_(images)
        buf.image_masks.copy_(image_masks)
        buf.tokens.copy_(tokens)
        buf.token_masks.copy_(token_masks)
        self.graphs.run("embed", self._embed_stage)

    @torch.no_grad()
    def denoise(self, state: torch.Tensor, noise: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
        """All Euler steps of the action expert over the cached prefix; [B, H, action_dim] fp32."""
        buf = self._require_buffers("denoise")
        b = buf.tokens.shape[0]
        want = (b, self.cfg.action_horizon, self.cfg.action_dim)
        if tuple(noise.shape) != want:
            raise ValueError(f"noise must be {list(want)} for this batch, got shape {tuple(noise.shape)}.")
        if buf.state is not None:
            if tuple(state.shape) != tuple(buf.state.shape):
                raise ValueError(
                    f"state must be {list(buf.state.shape)} for this batch, got shape {tuple(state.shape)}."
                )
            buf.state.copy_(state)
        buf.noise.copy_(noise)
        schedule = self.schedule(num_steps or self.cfg.num_steps)
        return self._run_denoise(schedule)

    # ---- setup -----------------------------------------------------------------------
    def _compute_schedule(self, n: int) -> Schedule:
        m, width = self.model, self.cfg.expert.width
        # The same float32 values the plain sampler builds with torch.full(1.0 - step / n).
        t = torch.tensor([1.0 - step / n for step in range(n)], dtype=torch.float32, device=self.device)
        time_emb = sincos_time_embedding(t, width)
        if self.cfg.pi05:
            cond = F.silu(m.time_mlp_out(F.silu(m.time_mlp_in(time_emb))))
            norms = [
                norm for layer in m.expert.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)
            ]
            modulations = torch.stack([norm.modulation(cond) for norm in [*norms, m.expert.norm]], dim=1)
            return Schedule(n, modulations, None)
        if self._split_time:
            mlp_in = m.action_time_mlp_in
            time_emb = F.linear(time_emb, mlp_in.weight[:, width:], mlp_in.bias)
        return Schedule(n, None, time_emb)

    def _allocate(self, image_shape: tuple[int, ...], prompt_len: int) -> StaticBuffers:
        cfg, dev, dtype = self.cfg, self.device, self.dtype
        b, c = image_shape[:2]
        horizon, llm = cfg.action_horizon, cfg.llm
        p = c * cfg.vision.num_patches + prompt_len
        # π0: [state token | action tokens], the state token attending only to itself; π0.5: actions only.
        ar = [1] + [0] * (horizon - 1) if cfg.pi05 else [1, 1] + [0] * (horizon - 1)
        s = len(ar)
        suffix_ar = torch.tensor([ar], dtype=torch.bool, device=dev)
        actions = torch.zeros(b, horizon, cfg.action_dim, device=dev)
        return StaticBuffers(
            images=torch.zeros(image_shape, device=dev),
            image_masks=torch.zeros(b, c, dtype=torch.bool, device=dev),
            tokens=torch.zeros(b, prompt_len, dtype=torch.int64, device=dev),
            token_masks=torch.zeros(b, prompt_len, dtype=torch.bool, device=dev),
            state=None if cfg.pi05 else torch.zeros(b, self.model.state_proj.in_features, device=dev),
            noise=torch.zeros_like(actions),
            actions=actions,
            prefix_embs=torch.zeros(b, p, llm.width, dtype=dtype, device=dev),
            prefix_pad=torch.zeros(b, p, dtype=torch.bool, device=dev),
            kv=torch.zeros(llm.depth, 2, b, llm.num_kv_heads, p + s, llm.head_dim, dtype=dtype, device=dev),
            suffix_allowed=make_att_2d_masks(torch.ones_like(suffix_ar), suffix_ar),
            suffix_offsets=torch.arange(s, device=dev),
            suffix_bias=torch.zeros(b, 1, s, p + s, dtype=dtype, device=dev),
            suffix_cos=torch.zeros(b, 1, s, llm.head_dim, device=dev),
            suffix_sin=torch.zeros(b, 1, s, llm.head_dim, device=dev),
        )

    # ---- stages: static tensors in, static tensors out, capture-safe -----------------
    def _embed_stage(self) -> None:
        buf = self.buffers
        embs, pad, _ = self.model.embed_prefix(buf.images, buf.image_masks, buf.tokens, buf.token_masks)
        buf.prefix_embs.copy_(embs)
        buf.prefix_pad.copy_(pad)

    def _prefix_stage(self) -> None:
        buf, llm = self.buffers, self.cfg.llm
        pad = buf.prefix_pad
        b, p = pad.shape
        cos, sin = rope_cos_sin(torch.cumsum(pad.long(), dim=1) - 1, llm.head_dim, llm.rope_theta)
        # The prefix is bidirectional; one bias serves every layer.
        bias = attention_bias(make_att_2d_masks(pad, torch.zeros_like(pad)), self.dtype)
        x = buf.prefix_embs
        layers = self.model.llm.layers
        for i, layer in enumerate(layers):
            q, k, v, _ = layer.project_qkv(x, None)
            k = apply_rope(k, cos, sin)
            buf.kv[i, 0, :, :, :p].copy_(k)
            buf.kv[i, 1, :, :, :p].copy_(v)
            # The expert reads only the K/V of the last layer, never its output.
            if i + 1 < len(layers):
                x = layer.finish(x, attend(apply_rope(q, cos, sin), k, v, bias), None, None)
        s = buf.suffix_allowed.shape[1]
        allowed = torch.cat([pad[:, None, :].expand(b, s, p), buf.suffix_allowed.expand(b, s, s)], dim=2)
        buf.suffix_bias.copy_(attention_bias(allowed, self.dtype))
        positions = pad.sum(dim=1, keepdim=True) + buf.suffix_offsets
        cos, sin = rope_cos_sin(positions, llm.head_dim, llm.rope_theta)
        buf.suffix_cos.copy_(cos)
        buf.suffix_sin.copy_(sin)

    def _denoise_stage(self, schedule: Schedule) -> None:
        buf, n = self.buffers, schedule.num_steps
        x_t = buf.actions
        x_t.copy_(buf.noise)
        # π0's state token is the same on every step.
        state_token = None if buf.state is None else self.model.state_proj(buf.state)[:, None, :]
        for step in range(n):
            x_t.sub_(self._velocity(x_t, step, schedule, state_token) / n)

    def _velocity(
        self, x_t: torch.Tensor, step: int, schedule: Schedule, state_token: torch.Tensor | None
    ) -> torch.Tensor:
        buf, m = self.buffers, self.model
        x = self._suffix(x_t, step, schedule, state_token)
        p = buf.kv.shape[-2] - x.shape[1]
        mods = None if schedule.modulations is None else schedule.modulations[step]

        def modulation(j: int) -> torch.Tensor | None:
            return None if mods is None else mods[j, None]

        for i, layer in enumerate(m.expert.layers):
            h, gate = _norm(layer.input_layernorm, x, modulation(2 * i))
            q, k, v = layer.self_attn.project(h)
            buf.kv[i, 0, :, :, p:].copy_(apply_rope(k, buf.suffix_cos, buf.suffix_sin))
            buf.kv[i, 1, :, :, p:].copy_(v)
            out = attend(apply_rope(q, buf.suffix_cos, buf.suffix_sin), buf.kv[i, 0], buf.kv[i, 1], buf.suffix_bias)
            x = gated_residual(x, layer.self_attn.o_proj(out.to(x.dtype)), gate)
            h, gate = _norm(layer.post_attention_layernorm, x, modulation(2 * i + 1))
            x = gated_residual(x, layer.mlp(h), gate)
        out, _ = _norm(m.expert.norm, x, modulation(-1))
        return m.action_out_proj(out[:, -self.cfg.action_horizon :].float())

    def _suffix(
        self, x_t: torch.Tensor, step: int, schedule: Schedule, state_token: torch.Tensor | None
    ) -> torch.Tensor:
        m = self.model
        action_emb = m.action_in_proj(x_t)
        if self.cfg.pi05:
            return action_emb.to(self.dtype)
        time = schedule.time[step]
        if self._split_time:
            fused = F.linear(action_emb, m.action_time_mlp_in.weight[:, : self.cfg.expert.width]) + time
        else:
            fused = m.action_time_mlp_in(torch.cat([action_emb, time.expand_as(action_emb)], dim=2))
        action_time = m.action_time_mlp_out(F.silu(fused))
        return torch.cat([state_token, action_time], dim=1).to(self.dtype)
