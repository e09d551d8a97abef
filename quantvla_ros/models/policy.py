"""The `Policy` API: the one seam the ROS layer talks to.

    policy = load_policy(path, device="cuda")          # quantvla_ros.loader: checkpoint or artifact
    chunk = policy.predict(Observation(images={...}, instruction="...", state=...), noise=None)

`predict` takes robot units in and gives robot units out: the family's processor shapes the
images and the prompt (π0.5 writes the normalized state into it), the state is normalized with
the checkpoint's statistics, and the action chunk is un-normalized and cut to the robot's
action dimension. The same class serves every family (π0 / π0.5, GR00T N1.5, SmolVLA).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.checkpoint import CheckpointError, CheckpointInfo
from quantvla_ros.models.common.normalizer import Normalizer, pad_to_dim
from quantvla_ros.models.device import resolve_device
from quantvla_ros.models.family import InputProcessor
from quantvla_ros.models.registry import load_model
from quantvla_ros.models.stages import Sampler, StagedModel


@dataclass
class Observation:
    images: dict[str, np.ndarray]  # camera name -> uint8 H×W×3 RGB
    instruction: str
    state: np.ndarray  # robot units, shape [state_dim]


@dataclass
class ActionChunk:
    actions: np.ndarray  # [horizon, action_dim] robot units
    dt: float | None  # seconds between actions; None when the checkpoint does not say


@dataclass
class ModelInputs:
    """A batch of one observation as the model consumes it."""

    images: torch.Tensor  # [1, cameras, 3, S, S] in [-1, 1]
    image_masks: torch.Tensor  # [1, cameras] bool
    tokens: torch.Tensor  # [1, max_token_len] int64
    token_masks: torch.Tensor  # [1, max_token_len] bool
    state: torch.Tensor  # [1, model max_state_dim] normalized and padded

    def to(self, device: str | torch.device) -> ModelInputs:
        return ModelInputs(**{name: t.to(device) for name, t in vars(self).items()})


class CalibrationSource(Protocol):
    """Observations prepared for one policy, in batches: all that calibration and fidelity reports
    read (a calibration buffer from recorded bags is one; data.buffer.CalibrationBuffer)."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, device: str | torch.device = "cpu") -> Iterator[ModelInputs]:
        """Every sample once, in order, as batches of at most batch_size on `device`."""
        ...


class Policy:
    def __init__(
        self,
        model: StagedModel,
        info: CheckpointInfo,
        processor: InputProcessor,
        action_dt: float | None = None,
        quant_config: dict | None = None,
    ) -> None:
        self.model = model
        # What runs sample_actions: the model itself, or an inference engine over it (see loader.py).
        self.sampler: Sampler = model
        self.info = info
        self.processor = processor
        self.action_dt = action_dt
        # The artifact's quant_config.json when the weights are quantized (method, bits, α, β...).
        self.quant_config = quant_config
        cfg = model.cfg
        stats = info.norm_stats
        self._state_norm = _normalizer(info.state_norm, stats.get("state"), info.norm_eps, info, "state")
        self._action_norm = _normalizer(info.action_norm, stats.get("actions"), info.norm_eps, info, "actions")
        self.camera_names: tuple[str, ...] = tuple(cfg.camera_names)
        self.state_dim: int | None = info.state_dim
        self.action_dim: int = info.action_dim or cfg.action_dim
        self.horizon: int = cfg.action_horizon

    def input_signature(self) -> dict:
        """Everything `prepare` depends on; buffers of prepared inputs record it so they are
        only ever fed to a policy that would have prepared them identically."""
        cfg = self.model.cfg
        stats = hashlib.sha256()
        state_stats = self.info.norm_stats.get("state")
        for name in ("mean", "std", "q01", "q99", "min", "max"):
            value = getattr(state_stats, name, None)
            stats.update(b"-" if value is None else value.tobytes())
        return {
            "model": self.model.display_name,
            "cameras": list(self.camera_names),
            "action_dim": cfg.action_dim,
            "max_state_dim": cfg.max_state_dim,
            "state_dim": self.state_dim,
            "state_norm": self.info.state_norm,
            "state_stats_sha256": stats.hexdigest(),
            "robot_adapter": None if self.info.adapter is None else self.info.adapter.name,
            **self.processor.signature(),
        }

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prepare(self, obs: Observation) -> ModelInputs:
        """Observation in robot units -> model tensors; every user error is one clear sentence."""
        cfg = self.model.cfg
        state = checked_state(obs, self.camera_names, self.state_dim, cfg.max_state_dim)
        images, masks = self.processor.images(obs.images)
        state = self._adapt("state", state, normalized=False)
        state_norm = self._state_norm.normalize(state) if self._state_norm else state
        state_norm = self._adapt("state", state_norm, normalized=True)
        tokens, token_mask = self.processor.prompt(obs.instruction, state_norm)
        dev = self.device
        return ModelInputs(
            images=torch.from_numpy(images)[None].to(dev),
            image_masks=torch.tensor([masks], device=dev),
            tokens=torch.from_numpy(tokens)[None].to(dev),
            token_masks=torch.from_numpy(token_mask)[None].to(dev),
            state=torch.from_numpy(pad_to_dim(state_norm, cfg.max_state_dim))[None].to(dev),
        )

    def sample(self, inputs: ModelInputs, noise: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Normalized actions [B, horizon, model action_dim]; noise is [horizon, dim] or [B, horizon, dim]."""
        cfg = self.model.cfg
        batch = inputs.images.shape[0]
        shape = (batch, cfg.action_horizon, cfg.action_dim)
        if noise is None:
            noise_t = torch.randn(shape, device=self.device)
        else:
            noise_t = torch.as_tensor(noise, dtype=torch.float32).to(self.device)
            if noise_t.dim() == 2:
                noise_t = noise_t[None].expand(batch, -1, -1)
            if tuple(noise_t.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise_t.shape)}; this policy needs {shape[1:]}.")
        return self.sampler.sample_actions(
            inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks, inputs.state, noise_t
        )

    def act(self, inputs: ModelInputs, noise: np.ndarray | torch.Tensor | None = None) -> ActionChunk:
        """The action chunk in robot units for one prepared observation."""
        actions = self.sample(inputs, noise)[0, :, : self.action_dim].cpu().numpy()
        actions = self._adapt("actions", actions, normalized=True)
        if self._action_norm:
            actions = self._action_norm.unnormalize(actions)
        actions = self._adapt("actions", actions, normalized=False)
        return ActionChunk(actions=actions.astype(np.float32), dt=self.action_dt)

    def predict(self, obs: Observation, noise: np.ndarray | torch.Tensor | None = None) -> ActionChunk:
        """prepare() then act(): robot units in, robot units out."""
        return self.act(self.prepare(obs), noise)

    def _adapt(self, what: str, values: np.ndarray, normalized: bool) -> np.ndarray:
        """The checkpoint's robot adapter on the state or the actions, at the side of the
        (un)normalization where its training pipeline applied it."""
        adapter = self.info.adapter
        if adapter is None or adapter.normalized != normalized:
            return values
        return getattr(adapter, what)(values)


def checked_state(
    obs: Observation, camera_names: tuple[str, ...], state_dim: int | None, max_state_dim: int
) -> np.ndarray:
    """The observation's state as float32, once its cameras and state fit a policy with these
    inputs; needs only a checkpoint's description, so a caller can check before loading weights."""
    unknown = sorted(set(obs.images) - set(camera_names))
    if unknown:
        raise QuantVLAError(f"Observation camera(s) {unknown} are not inputs of this policy; use {list(camera_names)}.")
    if not obs.images:
        raise QuantVLAError(f"The observation has no image; send at least one of {list(camera_names)}.")
    state = np.asarray(obs.state, dtype=np.float32).reshape(-1)
    if state_dim is not None and state.shape[0] != state_dim:
        raise QuantVLAError(f"The state has {state.shape[0]} values but this policy expects {state_dim}.")
    if state.shape[0] > max_state_dim:
        raise QuantVLAError(f"The state has {state.shape[0]} values; this model takes at most {max_state_dim}.")
    if not np.all(np.isfinite(state)):
        raise QuantVLAError("The state contains NaN or Inf; refusing to run the policy on it.")
    return state


def _normalizer(mode, stats, eps, info: CheckpointInfo, what: str) -> Normalizer | None:
    if mode is None:
        return None
    if stats is None:
        raise CheckpointError(f"{info.path} has no normalization statistics for {what}; add them or export them again.")
    return Normalizer(stats, mode=mode, eps=eps)


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_float_policy(
    path: Path | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    asset_id: str | None = None,
    action_dt: float | None = None,
) -> Policy:
    """Load a float checkpoint folder of any registered family onto `device` ("auto": CUDA when
    present); `quantvla_ros.loader.load_policy` also takes quantized artifacts and is what
    applications call."""
    path = Path(path)
    device = resolve_device(device)
    if not path.exists():
        raise QuantVLAError(f"Policy path {path} does not exist; pass a checkpoint folder.")
    model, info, family = load_model(path, device, dtype or default_dtype(device), asset_id)
    return Policy(model, info, family.make_processor(info), action_dt)
