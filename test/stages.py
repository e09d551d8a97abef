"""Running a model's stages by hand in tests: a workspace with the prefix computed."""

from __future__ import annotations

import torch

from quantvla_ros.models.stages import StagedModel, Workspace

# What sample_actions takes, in order (Workspace.load's arguments).
INPUT_NAMES = ("images", "image_masks", "tokens", "token_masks", "state", "noise")


def prefilled(model: StagedModel, batch: dict[str, torch.Tensor]) -> Workspace:
    """A workspace for `batch` (the six sample_actions tensors) after embed() and prefix()."""
    ws = model.workspace(tuple(batch["images"].shape), batch["tokens"].shape[1])
    with torch.no_grad():
        ws.load(*(batch[name] for name in INPUT_NAMES))
        model.embed(ws)
        model.prefix(ws)
    return ws
