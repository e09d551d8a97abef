"""`load_policy(path)`: a float checkpoint folder or a quantized artifact, as one `Policy`."""

from __future__ import annotations

from pathlib import Path

import torch

from quantvla_ros.models.policy import Policy, default_dtype, load_float_policy
from quantvla_ros.quant.artifact import is_artifact, load_artifact


def load_policy(
    path: Path | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    asset_id: str | None = None,
    action_dt: float | None = None,
) -> Policy:
    """Load a float checkpoint of any registered family or a `quantvla quantize` artifact."""
    path = Path(path)
    if not is_artifact(path):
        return load_float_policy(path, device, dtype, asset_id, action_dt)
    model, info, family, quant_config = load_artifact(path, device, dtype or default_dtype(device))
    return Policy(model, info, family.make_processor(info), action_dt, quant_config)
