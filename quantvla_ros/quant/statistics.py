"""Phase 1 of quantize_: run the float model over calibration data and record what later phases need.

Every observation pass is a full inference (`replay`) with one fixed noise draw per sample, so
that teacher and student, and every pass over the same data, integrate from the same start.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from quantvla_ros.models.policy import CalibrationSource
from quantvla_ros.models.stages import StagedModel
from quantvla_ros.progress import Progress as tqdm


def sample_noise(samples: int, horizon: int, action_dim: int, seed: int) -> torch.Tensor:
    """One fixed noise draw per sample [samples, horizon, action_dim]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, horizon, action_dim, generator=g)


@torch.no_grad()
def replay(model: StagedModel, source: CalibrationSource, batch_size: int, seed: int, desc: str | None = None) -> None:
    """Full inferences over the source, each sample with its `sample_noise` draw; hooks observe them."""
    cfg = model.cfg
    noise = sample_noise(len(source), cfg.action_horizon, cfg.action_dim, seed)
    device = model.device
    start = 0
    total = math.ceil(len(source) / batch_size)
    for inputs in tqdm(source.batches(batch_size, device), total=total, desc=desc, disable=desc is None, unit="batch"):
        n = inputs.images.shape[0]
        model.sample_actions(
            inputs.images,
            inputs.image_masks,
            inputs.tokens,
            inputs.token_masks,
            inputs.state,
            noise[start : start + n].to(device),
        )
        start += n


def observe_inputs(
    model: StagedModel,
    names: list[str],
    source: CalibrationSource,
    on_input: Callable[[str, torch.Tensor], None],
    batch_size: int,
    seed: int,
    desc: str | None,
) -> None:
    """Run full inferences over the source, handing each named Linear's input [tokens, K] to `on_input`."""
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: on_input(n, args[0].flatten(0, -2)))
        for n in names
    ]
    try:
        replay(model, source, batch_size, seed, desc)
    finally:
        for h in hooks:
            h.remove()


def collect_input_absmax(
    model: StagedModel,
    names: list[str],
    source: CalibrationSource,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| [K] of each named Linear over full inferences on the source.

    A layer whose output inference never reads (the last LLM layer's o_proj and MLP of π0 and
    SmolVLA: the expert takes only that layer's K/V) never runs and has no entry.
    """
    absmax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        amax = x.detach().abs().amax(dim=0).float().cpu()
        absmax[name] = amax if name not in absmax else torch.maximum(absmax[name], amax)

    observe_inputs(model, names, source, record, batch_size, seed, "activation ranges" if progress else None)
    return absmax
