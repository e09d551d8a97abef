"""Which torch device a user's `device` setting means: "auto" (CUDA when present, else the CPU),
"cpu", "cuda" or "cuda:N" — checked before anything is loaded onto it, so a machine without
CUDA gets one sentence instead of torch's assertion from deep inside a model load."""

from __future__ import annotations

import torch

from quantvla_ros.errors import QuantVLAError

HINT = "set --device (the nodes' `device` parameter) to cpu, or to auto to use CUDA only when present"


def resolve_device(device: str | torch.device) -> torch.device:
    name = str(device).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise QuantVLAError(f"Device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N.") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise QuantVLAError(f"Device {name!r} is not available here ({why}); {HINT}.")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise QuantVLAError(f"Device {name!r} is not available here (this machine has {count} CUDA device(s)); {HINT}.")
    return resolved
