"""`load_policy(path)`: a float checkpoint folder or a quantized artifact, as one `Policy`,
run on CUDA by the inference engine (static buffers, precomputed timestep schedule, CUDA graphs)."""

from __future__ import annotations

from pathlib import Path

import torch

from quantvla_ros.engine.staged import StagedEngine
from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.device import resolve_device
from quantvla_ros.models.policy import Policy, default_dtype, load_float_policy
from quantvla_ros.quant.artifact import is_artifact, load_artifact

ENGINE_MODES = ("auto", "on", "off")  # auto = on CUDA


def load_policy(
    path: Path | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    asset_id: str | None = None,
    action_dt: float | None = None,
    engine: str = "auto",
) -> Policy:
    """Load a float checkpoint of any registered family or a `quantvla quantize` artifact onto
    `device` ("auto": CUDA when present)."""
    if engine not in ENGINE_MODES:
        raise QuantVLAError(f"engine {engine!r} must be one of {', '.join(ENGINE_MODES)}.")
    path = Path(path)
    device = resolve_device(device)
    if is_artifact(path):
        model, info, family, quant_config = load_artifact(path, device, dtype or default_dtype(device))
        policy = Policy(model, info, family.make_processor(info), action_dt, quant_config)
    else:
        policy = load_float_policy(path, device, dtype, asset_id, action_dt)
    return use_engine(policy, engine)


def use_engine(policy: Policy, engine: str) -> Policy:
    """Run the policy through the inference engine: "on", "off", or "auto" (on CUDA only)."""
    if engine == "on" or (engine == "auto" and policy.device.type == "cuda"):
        policy.sampler = StagedEngine(policy.model)
    return policy
