"""What the inference engines share: three stages over static buffers, a schedule cache, CUDA graphs.

An engine runs one loaded model as embed() -> prefix() -> denoise(): the vision stage, the
backbone pass that fills what every step reads, and the whole Euler loop. Each family's engine
supplies the stages, its precomputed `_compute_schedule(n)` and `_allocate(...)` of the static
buffers; this class validates inputs, reallocates on a new input shape (dropping the graphs
captured on the old buffers), caches one schedule per step count and captures each stage as a
CUDA graph on CUDA (eagerly elsewhere), optionally under torch.compile.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from quantvla_ros.engine.graphs import StageGraphs


class StagedEngine(ABC):
    def __init__(self, model: nn.Module, cuda_graphs: bool = True, compile: bool = False) -> None:
        """Subclasses set what their schedule needs first, then call this (it computes the default schedule)."""
        self.model = model.eval()
        self.cfg = model.cfg
        self.dtype = model.compute_dtype
        self.device = model.device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.buffers: Any = None
        self.graphs = StageGraphs(self.cuda_graphs)
        self._schedules: dict[int, Any] = {}
        wrap = functools.partial(torch.compile, dynamic=False) if compile else (lambda fn: fn)
        self._embed_stage = wrap(self._embed_stage)
        self._prefix_stage = wrap(self._prefix_stage)
        self._denoise_stage = wrap(self._denoise_stage)
        self.schedule(self.cfg.num_steps)

    @torch.no_grad()
    def prefix(self) -> None:
        """The backbone pass over the embedded prompt: fills what every denoising step reads."""
        self._require_buffers("prefix")
        self.graphs.run("prefix", self._prefix_stage)

    @torch.no_grad()
    def schedule(self, num_steps: int) -> Any:
        """The precomputed schedule of an n-step integration (computed on first use, then kept)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
        if num_steps not in self._schedules:
            self._schedules[num_steps] = self._compute_schedule(num_steps)
        return self._schedules[num_steps]

    def _run_denoise(self, schedule: Any) -> torch.Tensor:
        self.graphs.run(("denoise", schedule.num_steps), functools.partial(self._denoise_stage, schedule))
        return self.buffers.actions.clone()

    def _require_buffers(self, stage: str) -> Any:
        if self.buffers is None:
            raise RuntimeError(f"{type(self).__name__}.{stage}() needs the prefix; call embed() (and prefix()) first.")
        return self.buffers

    def _buffers_for(
        self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_masks: torch.Tensor
    ) -> Any:
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [batch, cameras, 3, height, width], got shape {tuple(images.shape)}.")
        b, c = images.shape[:2]
        if tuple(image_masks.shape) != (b, c):
            raise ValueError(f"image_masks must be [{b}, {c}] to match images, got shape {tuple(image_masks.shape)}.")
        if tokens.dim() != 2 or tokens.shape[0] != b:
            raise ValueError(f"tokens must be [{b}, prompt length] to match images, got shape {tuple(tokens.shape)}.")
        if token_masks.shape != tokens.shape:
            raise ValueError(
                f"token_masks must have the shape of tokens {list(tokens.shape)}, got {tuple(token_masks.shape)}."
            )
        buf = self.buffers
        if buf is None or buf.images.shape != images.shape or buf.tokens.shape != tokens.shape:
            self.buffers = buf = self._allocate(tuple(images.shape), tokens.shape[1])
            self.graphs = StageGraphs(self.cuda_graphs)
        return buf

    @abstractmethod
    def _compute_schedule(self, n: int) -> Any:
        """Everything the timesteps of an n-step integration determine; has `num_steps`."""

    @abstractmethod
    def _allocate(self, image_shape: tuple[int, ...], prompt_len: int) -> Any:
        """The static buffers for one input shape; they hold `images`, `tokens` and `actions`."""

    @abstractmethod
    def _embed_stage(self) -> None: ...

    @abstractmethod
    def _prefix_stage(self) -> None: ...

    @abstractmethod
    def _denoise_stage(self, schedule: Any) -> None: ...
