"""The flow-matching sampler every family shares, written once over the family's stages.

A policy model computes an action chunk in three stages over a `Workspace`, the tensors that
cross stage boundaries for one input shape:

    embed(ws)              vision tower and prompt embedding -> the prefix embeddings
    prefix(ws)             the backbone pass over them -> what every denoising step reads (K/V, masks, RoPE)
    denoise(ws, schedule)  every Euler step of the action expert, noise -> actions, in ws.actions

`step_constants(n)` computes everything the n fixed timesteps determine (time embeddings, adaptive
norm modulations, the time half of the action-time MLP), once per step count.

`sample_actions` runs the three stages over a fresh workspace; the inference engine
(`quantvla_ros.engine`) runs the same stages over a workspace it keeps per input shape, caches
the schedule per step count and captures each stage as a CUDA graph. Plain and engine paths share
every line of model math. Stages therefore write their results into the workspace in place, build
no tensor from host data and never synchronize with the host, so that they can be captured.
"""

from __future__ import annotations

import dataclasses
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

# observer(site, q, k, allowed, own_keys): post-RoPE queries [B, H, Tq, d], keys [B, Hkv, Tk, d] and
# the bool mask [B, Tq, Tk] of one action-expert attention during a denoising step; own_keys is how
# many of the last keys are the querying tokens' own (the rest are cached context), None when
# every key is context (cross-attention).
AttentionObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int | None], None]


@dataclass
class Workspace:
    """The inputs and the result of one inference; each family's workspace adds its intermediates."""

    images: torch.Tensor  # [B, C, 3, H, W] float32 in [-1, 1]
    image_masks: torch.Tensor  # [B, C] bool
    tokens: torch.Tensor  # [B, L] int64
    token_masks: torch.Tensor  # [B, L] bool
    state: torch.Tensor  # [B, max_state_dim] float32, normalized and padded
    noise: torch.Tensor  # [B, horizon, action_dim] float32
    actions: torch.Tensor  # [B, horizon, action_dim] float32: x_t during the steps, the result after

    def load(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        state: torch.Tensor,
        noise: torch.Tensor,
    ) -> None:
        """Copy one batch in (shapes checked by `StagedModel.check_inputs`)."""
        self.images.copy_(images)
        self.image_masks.copy_(image_masks)
        self.tokens.copy_(tokens)
        self.token_masks.copy_(token_masks)
        self.state.copy_(state)
        self.noise.copy_(noise)

    def fits(self, images: torch.Tensor, tokens: torch.Tensor) -> bool:
        """Whether a batch of this shape can be loaded into these buffers."""
        return self.images.shape == images.shape and self.tokens.shape == tokens.shape


def input_buffers(cfg: Any, image_shape: tuple[int, ...], prompt_len: int, device: torch.device) -> dict:
    """Zeroed `Workspace` fields for one input shape, for a family's workspace() to extend."""
    b, c = image_shape[:2]
    actions = torch.zeros(b, cfg.action_horizon, cfg.action_dim, device=device)
    return dict(
        images=torch.zeros(image_shape, device=device),
        image_masks=torch.zeros(b, c, dtype=torch.bool, device=device),
        tokens=torch.zeros(b, prompt_len, dtype=torch.int64, device=device),
        token_masks=torch.zeros(b, prompt_len, dtype=torch.bool, device=device),
        state=torch.zeros(b, cfg.max_state_dim, device=device),
        noise=torch.zeros_like(actions),
        actions=actions,
    )


@dataclass(frozen=True)
class TimeConstants:
    """Tensors with a leading time axis: one row per timestep of a schedule, or per sample in training."""

    def row(self, i: int) -> TimeConstants:
        """Row i as a batch of one, which broadcasts over the samples of a denoising step."""
        return type(self)(
            **{f.name: None if (v := getattr(self, f.name)) is None else v[i : i + 1] for f in dataclasses.fields(self)}
        )


@dataclass(frozen=True)
class Schedule:
    """What the timesteps of an n-step Euler integration determine, computed once per step count."""

    num_steps: int
    constants: TimeConstants


class Sampler(Protocol):
    """What runs sample_actions for a Policy: the model itself, or the inference engine over it."""

    def sample_actions(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        state: torch.Tensor,
        noise: torch.Tensor,
        num_steps: int | None = None,
    ) -> torch.Tensor: ...


def parameter_count(*modules: nn.Module) -> int:
    """Parameters of the modules together (works on the meta device)."""
    return sum(p.numel() for m in modules for p in m.parameters())


class StagedModel(nn.Module, metaclass=ABCMeta):
    """Base of every family's model: `sample_actions` over the family's stages, dtype handling and input checks.

    A family sets FAMILY and LINEAR_GROUPS (see models/family.py) and implements workspace(),
    embed(), prefix(), timesteps(), time_constants(), denoise(), attention_sites(),
    parameter_dtype() and component_parameters().
    """

    FAMILY: ClassVar[str]
    LINEAR_GROUPS: ClassVar[dict[str, str]]

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = torch.float32
        # Set by calibration; called at each attention_sites()[i] on every denoising step while set.
        self.attention_observer: AttentionObserver | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_dtype(self, dtype: torch.dtype) -> StagedModel:
        """Weights in `dtype` except what the family keeps in fp32 (`parameter_dtype`); activations follow."""
        for name, param in self.named_parameters():
            param.data = param.data.to(self.parameter_dtype(name, dtype))
        self.compute_dtype = dtype
        return self

    @staticmethod
    @abstractmethod
    def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype parameter `name` is kept in when the model computes in `dtype`."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Rows of the prompt's token embedding."""

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs at this model's real shapes (every camera, a full prompt) on its device,
        as sample_actions takes them: what benchmarks time the stages with, without a processor."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(seed)
        size, cams = cfg.image_size, len(cfg.camera_names)
        inputs = dict(
            images=torch.rand(batch, cams, 3, size, size, generator=g) * 2 - 1,
            image_masks=torch.ones(batch, cams, dtype=torch.bool),
            tokens=torch.randint(0, self.vocab_size, (batch, cfg.max_token_len), generator=g),
            token_masks=torch.ones(batch, cfg.max_token_len, dtype=torch.bool),
            state=torch.zeros(batch, cfg.max_state_dim),
            noise=torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=g),
        )
        return {name: t.to(self.device) for name, t in inputs.items()}

    # ---- sampling ------------------------------------------------------------------------
    def check_inputs(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        state: torch.Tensor,
        noise: torch.Tensor,
    ) -> None:
        """One clear sentence for a batch the stages cannot take; families add their own checks."""
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [batch, cameras, 3, height, width], got shape {tuple(images.shape)}.")
        b, c = images.shape[:2]
        cfg = self.cfg
        if tuple(image_masks.shape) != (b, c):
            raise ValueError(f"image_masks must be [{b}, {c}] to match images, got shape {tuple(image_masks.shape)}.")
        if tokens.dim() != 2 or tokens.shape[0] != b:
            raise ValueError(f"tokens must be [{b}, prompt length] to match images, got shape {tuple(tokens.shape)}.")
        if token_masks.shape != tokens.shape:
            raise ValueError(
                f"token_masks must have the shape of tokens {list(tokens.shape)}, got {tuple(token_masks.shape)}."
            )
        if tuple(state.shape) != (b, cfg.max_state_dim):
            raise ValueError(f"state must be {[b, cfg.max_state_dim]} for this batch, got shape {tuple(state.shape)}.")
        want = (b, cfg.action_horizon, cfg.action_dim)
        if tuple(noise.shape) != want:
            raise ValueError(f"noise must be {list(want)} for this batch, got shape {tuple(noise.shape)}.")

    def step_constants(self, num_steps: int) -> Schedule:
        """Everything the timesteps of an n-step integration determine."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
        return Schedule(num_steps, self.time_constants(self.timesteps(num_steps)))

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
        """Normalized actions [B, horizon, action_dim] in fp32, integrated from noise of the same shape."""
        self.check_inputs(images, image_masks, tokens, token_masks, state, noise)
        schedule = self.step_constants(num_steps or self.cfg.num_steps)
        ws = self.workspace(tuple(images.shape), tokens.shape[1])
        ws.load(images, image_masks, tokens, token_masks, state, noise)
        self.embed(ws)
        self.prefix(ws)
        self.denoise(ws, schedule)
        return ws.actions

    # ---- the family's stages -------------------------------------------------------------
    @abstractmethod
    def workspace(self, image_shape: tuple[int, ...], prompt_len: int) -> Workspace:
        """The zeroed buffers of one inference for this input shape, on the model's device."""

    @abstractmethod
    def embed(self, ws: Workspace) -> None:
        """Vision stage: images and prompt -> the prefix embeddings."""

    @abstractmethod
    def prefix(self, ws: Workspace) -> None:
        """Backbone stage: fills everything the denoising steps read."""

    @abstractmethod
    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The n timesteps of the Euler integration, as the family's training discretizes them."""

    @abstractmethod
    def time_constants(self, t: torch.Tensor) -> TimeConstants:
        """Everything timesteps t [N] determine, one row per timestep."""

    @abstractmethod
    def denoise(self, ws: Workspace, schedule: Schedule) -> None:
        """Every Euler step of the action expert: ws.noise -> ws.actions."""
