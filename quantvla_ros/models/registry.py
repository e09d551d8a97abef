"""The policy families this package loads, and loading any of their checkpoints.

A checkpoint folder's config.json says which family it belongs to (openpi / LeRobot π0 and
π0.5, NVIDIA or LeRobot GR00T N1.5, LeRobot SmolVLA); everything after that goes through the
family's `ModelFamily` entry, so callers never branch on the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantvla_ros.models.common.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    CheckpointInfo,
    check_keys,
    read_json,
    read_tensors,
    weight_files,
)
from quantvla_ros.models.family import ModelFamily
from quantvla_ros.models.groot.config import groot_n15_full
from quantvla_ros.models.groot.family import GROOT_FAMILY
from quantvla_ros.models.pi0.checkpoint import PI0_FAMILY
from quantvla_ros.models.pi0.config import pi0_full, pi05_full
from quantvla_ros.models.smolvla.checkpoint import SMOLVLA_FAMILY
from quantvla_ros.models.smolvla.config import smolvla_full

FAMILIES: tuple[ModelFamily, ...] = (PI0_FAMILY, GROOT_FAMILY, SMOLVLA_FAMILY)

# The published models at full size, by name: `quantvla info pi05_full` and the benchmarks
# build them on the meta device or with random weights.
REFERENCE_CONFIGS: dict[str, tuple[ModelFamily, Callable[[], object]]] = {
    "pi0_full": (PI0_FAMILY, pi0_full),
    "pi05_full": (PI0_FAMILY, pi05_full),
    "groot_n1_5_full": (GROOT_FAMILY, groot_n15_full),
    "smolvla_full": (SMOLVLA_FAMILY, smolvla_full),
}


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"Unknown policy family {name!r}; this package knows {', '.join(f.name for f in FAMILIES)}.")


def family_of(model: nn.Module) -> ModelFamily:
    return family_named(model.FAMILY)


def family_for(path: Path | str) -> tuple[ModelFamily, dict]:
    """The family whose reader claims this folder's config.json, and the parsed config."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the checkpoint directory holding {CONFIG_FILE}.")
    raw = read_json(path / CONFIG_FILE)
    if raw.get("use_peft", False):
        raise CheckpointError(
            f"{path / CONFIG_FILE} sets use_peft: the folder holds a LeRobot PEFT adapter, not a whole policy; "
            "merge the adapter into its base policy (peft's merge_and_unload) and save that policy."
        )
    for family in FAMILIES:
        if family.claims(raw, path):
            return family, raw
    kind = raw.get("type", raw.get("model_type"))
    raise CheckpointError(
        f"{path / CONFIG_FILE} describes a {kind!r} policy; this package loads "
        f"{', '.join(f.name for f in FAMILIES)} checkpoints."
    )


def read_checkpoint(path: Path | str, asset_id: str | None = None) -> CheckpointInfo:
    path = Path(path)
    family, raw = family_for(path)
    return family.read_checkpoint(path, raw, asset_id)


def load_model(
    path: Path | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    asset_id: str | None = None,
    adapt: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, CheckpointInfo, ModelFamily]:
    """Load weights into a model built on the meta device; `adapt` may swap modules first
    (a quantized artifact replaces Linears with QuantLinears before its tensors are read)."""
    path = Path(path)
    family, raw = family_for(path)
    info = family.read_checkpoint(path, raw, asset_id)
    state, _ = family.canonical_state_dict(read_tensors(weight_files(info.path)), info.layout)
    with torch.device("meta"):
        model = family.build_model(info.config)
        if adapt is not None:
            adapt(model)
        model.set_dtype(dtype)
    check_keys(model, state, info.path)
    expected = model.state_dict()
    # Cast tensor by tensor so a bf16 checkpoint never exists twice in memory.
    state = {k: v.to(device=device, dtype=expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval(), info, family
