"""Calibration buffers: a few hundred observations, prepared exactly as the policy prepares them.

One safetensors file. Images are stored as uint8 at the model's resolution (already resized
with padding; a masked camera is all zeros), prompts as token ids with their masks, the state
normalized and padded. The JSON manifest in the file's metadata records the policy's input
signature (so a buffer is never fed to a model that would have prepared it differently), the
instructions, and where the samples came from (bag names and hashes, sample count).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from quantvla_ros.atomic import atomic_path
from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.policy import ModelInputs, Observation, Policy

BUFFER_FORMAT = "quantvla-calibration-buffer/1"
TENSORS = ("images", "image_masks", "tokens", "token_masks", "state")


class BufferError(QuantVLAError):
    """A calibration buffer that cannot be used; the message names the file."""


@dataclass
class CalibrationBuffer:
    images: torch.Tensor  # uint8 [N, cameras, S, S, 3]
    image_masks: torch.Tensor  # bool [N, cameras]
    tokens: torch.Tensor  # int64 [N, max_token_len]
    token_masks: torch.Tensor  # bool [N, max_token_len]
    state: torch.Tensor  # float32 [N, model action_dim], normalized and padded
    manifest: dict

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, batch_size: int, device: str | torch.device = "cpu") -> Iterator[ModelInputs]:
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            images = self.images[sl].to(device).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
            yield ModelInputs(
                images=images,
                image_masks=self.image_masks[sl].to(device),
                tokens=self.tokens[sl].to(device),
                token_masks=self.token_masks[sl].to(device),
                state=self.state[sl].to(device),
            )

    def check_matches(self, policy: Policy, source: str = "the calibration buffer") -> None:
        """Refuse a buffer prepared for a model whose preprocessing differs from `policy`'s."""
        recorded = self.manifest.get("signature", {})
        expected = policy.input_signature()
        differing = sorted(k for k in expected if recorded.get(k) != expected[k])
        if differing:
            raise BufferError(
                f"{source} was built for another model (different {', '.join(differing)}); "
                "rebuild it with this policy's checkpoint."
            )


def build_buffer(policy: Policy, observations: Iterable[Observation], sources: list[dict]) -> CalibrationBuffer:
    """Prepare observations with the policy's own preprocessing, as the policy node would."""
    prepared, instructions = [], []
    for obs in observations:
        prepared.append(policy.prepare(obs))
        instructions.append(obs.instruction)
    if not prepared:
        raise BufferError("No observations were given; a calibration buffer needs at least one sample.")

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name).cpu() for p in prepared])

    # π0 and GR00T resize uint8 pixels, so prepare() gives u/127.5 - 1 (and -1 for masked cameras)
    # and this is exact; SmolVLA resizes in float as LeRobot does, and its pixels are stored to the
    # nearest uint8 level (at most 1/255 off in model units, far below what calibration notices).
    images = ((cat("images") + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2)
    return CalibrationBuffer(
        images=images.contiguous(),
        image_masks=cat("image_masks"),
        tokens=cat("tokens"),
        token_masks=cat("token_masks"),
        state=cat("state").float(),
        manifest={
            "format": BUFFER_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "samples": len(prepared),
            "signature": policy.input_signature(),
            "instructions": sorted(set(instructions)),
            "sources": sources,
        },
    )


def save_buffer(buffer: CalibrationBuffer, path: Path | str) -> Path:
    path = Path(path)
    tensors = {name: getattr(buffer, name).contiguous() for name in TENSORS}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"manifest": json.dumps(buffer.manifest)})
    return path


def load_buffer(path: Path | str) -> CalibrationBuffer:
    path = Path(path)
    if not path.is_file():
        raise BufferError(f"Calibration buffer {path} does not exist; build one with `quantvla calibrate`.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise BufferError(f"Calibration buffer {path} is not a readable safetensors file ({e}); rebuild it.") from None
    try:
        manifest = json.loads(metadata["manifest"])
    except (KeyError, json.JSONDecodeError):
        raise BufferError(f"{path} has no calibration manifest; it is not a buffer written by quantvla.") from None
    if manifest.get("format") != BUFFER_FORMAT:
        raise BufferError(f"{path} is in format {manifest.get('format')!r}; this version reads {BUFFER_FORMAT}.")
    missing = [n for n in TENSORS if n not in tensors]
    if missing:
        raise BufferError(f"Calibration buffer {path} lacks tensor(s) {', '.join(missing)}; rebuild it.")
    counts = {tensors[n].shape[0] for n in TENSORS}
    if counts == {0}:
        raise BufferError(f"Calibration buffer {path} holds no samples; record more data and rebuild it.")
    if len(counts) != 1:
        raise BufferError(f"Calibration buffer {path} has tensors with different sample counts; rebuild it.")
    return CalibrationBuffer(**{n: tensors[n] for n in TENSORS}, manifest=manifest)
