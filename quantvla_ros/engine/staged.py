"""The inference engine: a model's own stages over static buffers, a schedule cache and CUDA graphs.

`StagedEngine(model).sample_actions(...)` computes what `model.sample_actions(...)` computes, with
the same code: both run the model's stages (models/stages.py) embed() -> prefix() -> denoise().
What the engine adds is only around them:

- the workspace (every tensor that crosses a stage) is allocated once per input shape (batch,
  cameras, image size, prompt length) and reused, so its addresses stay fixed; a new shape
  reallocates it and drops the graphs captured on the old one;
- the schedule (`model.step_constants(n)`: time embeddings, adaptive-norm modulations, the time
  half of the action-time MLP) is computed once per step count and kept;
- on CUDA each stage is captured once as a CUDA graph and replayed: the vision stage, the prefix
  pass and all Euler steps of the denoising loop (one graph per step count). On the CPU, or with
  cuda_graphs=False, the same stages run eagerly. compile=True also wraps them in torch.compile.

The stages are public so a benchmark can time them: load() the inputs, then embed(), prefix(),
denoise(). Build the engine after quantizing or loading: the schedules and the graphs hold the
model's weights as they were then. The engine runs for every family; it knows none of them.
"""

from __future__ import annotations

import functools

import torch

from quantvla_ros.engine.graphs import StageGraphs
from quantvla_ros.models.stages import Schedule, StagedModel, Workspace


class StagedEngine:
    def __init__(self, model: StagedModel, cuda_graphs: bool = True, compile: bool = False) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = model.device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.workspace: Workspace | None = None
        self.graphs = StageGraphs(self.cuda_graphs)
        self._schedules: dict[int, Schedule] = {}
        wrap = functools.partial(torch.compile, dynamic=False) if compile else (lambda fn: fn)
        self._embed, self._prefix, self._denoise = wrap(model.embed), wrap(model.prefix), wrap(model.denoise)
        self.schedule(self.cfg.num_steps)

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
        """Normalized actions [B, horizon, action_dim] in fp32, as the model's own sample_actions."""
        self.load(images, image_masks, tokens, token_masks, state, noise)
        self.embed()
        self.prefix()
        return self.denoise(num_steps)

    @torch.no_grad()
    def load(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        state: torch.Tensor,
        noise: torch.Tensor,
    ) -> None:
        """Check one batch and copy it into the static workspace (reallocated for a new shape)."""
        self.model.check_inputs(images, image_masks, tokens, token_masks, state, noise)
        if self.workspace is None or not self.workspace.fits(images, tokens):
            self.workspace = self.model.workspace(tuple(images.shape), tokens.shape[1])
            self.graphs = StageGraphs(self.cuda_graphs)
        self.workspace.load(images, image_masks, tokens, token_masks, state, noise)

    @torch.no_grad()
    def embed(self) -> None:
        """Vision stage: the model's embed() over the loaded inputs."""
        self.graphs.run("embed", functools.partial(self._embed, self._loaded("embed")))

    @torch.no_grad()
    def prefix(self) -> None:
        """Backbone stage: fills what every denoising step reads."""
        self.graphs.run("prefix", functools.partial(self._prefix, self._loaded("prefix")))

    @torch.no_grad()
    def denoise(self, num_steps: int | None = None) -> torch.Tensor:
        """All Euler steps of the action expert; a copy of the actions [B, H, action_dim] fp32."""
        ws = self._loaded("denoise")
        schedule = self.schedule(num_steps or self.cfg.num_steps)
        self.graphs.run(("denoise", schedule.num_steps), functools.partial(self._denoise, ws, schedule))
        return ws.actions.clone()

    @torch.no_grad()
    def schedule(self, num_steps: int) -> Schedule:
        """The step constants of an n-step integration (computed on first use, then kept)."""
        if num_steps not in self._schedules:
            self._schedules[num_steps] = self.model.step_constants(num_steps)
        return self._schedules[num_steps]

    def _loaded(self, stage: str) -> Workspace:
        if self.workspace is None:
            raise RuntimeError(f"StagedEngine.{stage}() needs inputs; call load() (or sample_actions()) first.")
        return self.workspace
