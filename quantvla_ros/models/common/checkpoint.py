"""What every checkpoint folder has in common: safetensors weights (single or sharded), a
config.json, strict key checks, and the description of a checkpoint without its weights.

Each family's reader and writer (`pi0_checkpoint.py`, `groot_checkpoint.py`,
`smolvla_checkpoint.py`) builds on these; `registry.py` picks the family and loads.
Nothing is unpickled: weights are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from quantvla_ros.atomic import atomic_path, write_bytes_atomic, write_json_atomic
from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.normalizer import NormStats, load_lerobot_norm_stats, save_lerobot_norm_stats

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# LeRobot before its processor pipelines (< 0.4) kept normalization statistics as buffers among the
# weights: `normalize_inputs.buffer_observation_state.mean`, `unnormalize_outputs.buffer_action.std`.
LEGACY_LEROBOT_NORMALIZER = re.compile(
    r"^(normalize_inputs|normalize_targets|unnormalize_outputs)\.buffer_(\w+)\.(mean|std|min|max)$"
)
_LEGACY_FEATURES = {"observation_state": "state", "action": "actions"}


class CheckpointError(QuantVLAError):
    """A checkpoint that cannot be used as it is; the message names the file or key."""


@dataclass(frozen=True)
class RobotAdapter:
    """A conversion between the robot's units and the ones the model was trained in, which a
    checkpoint's config asks for (LeRobot's `adapt_to_pi_aloha`). `normalized` says where the
    training pipeline applied it: to normalized values (after the state's normalization, before
    the actions' un-normalization) or to robot units."""

    name: str
    state: Callable[[np.ndarray], np.ndarray]  # robot -> model, on one state vector
    actions: Callable[[np.ndarray], np.ndarray]  # model -> robot, on [horizon, action_dim]
    normalized: bool


@dataclass
class CheckpointInfo:
    """Everything about a checkpoint except its weights."""

    path: Path
    layout: str  # "openpi" | "lerobot" | "nvidia"
    config: Any  # the family's config dataclass
    norm_stats: dict[str, NormStats]  # "state" and "actions"
    state_norm: str | None  # "mean_std" | "quantiles" | "min_max" | None (identity)
    action_norm: str | None
    state_dim: int | None  # robot units before padding; None = take what the user sends
    action_dim: int | None  # robot units after slicing; None = all model dims
    norm_eps: float
    asset_id: str | None = None  # openpi asset / GR00T embodiment tag the statistics belong to
    adapter: RobotAdapter | None = None
    action_names: tuple[str, ...] | None = None  # where the checkpoint names its action dimensions


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a policy checkpoint folder needs it.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-export the checkpoint."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    return data


def refuse_settings(file: Path, settings: list[tuple[str, Any, Any]], advice: str) -> None:
    """Refuse in one sentence every config field, given as (name, value read, the value this package
    runs), whose value it cannot honour: a field that changes the inputs or outputs is read or
    refused where each family parses its config, never left unread."""
    wrong = [
        f"{name}={json.dumps(value)} (supported: {json.dumps(run)})" for name, value, run in settings if value != run
    ]
    if wrong:
        raise CheckpointError(f"{file} sets {', '.join(wrong)}; {advice}")


def lerobot_visual_normalization(raw: dict) -> tuple[str, Any, Any]:
    """LeRobot normalizes images only when normalization_mapping asks for it; no reader here does."""
    return (
        "normalization_mapping.VISUAL",
        (raw.get("normalization_mapping") or {}).get("VISUAL", "IDENTITY"),
        "IDENTITY",
    )


def processor_state_file(path: Path, pipeline_json: str, registry_name: str) -> Path | None:
    """The state file a LeRobot processor pipeline JSON names for one step (e.g. its normalizer);
    the step index varies between policies, so the JSON is the only reliable source."""
    pipeline = path / pipeline_json
    if not pipeline.exists():
        return None
    for step in read_json(pipeline).get("steps", []):
        if step.get("registry_name") == registry_name and step.get("state_file"):
            return path / step["state_file"]
    return None


def lerobot_norm_stats(path: Path) -> dict[str, NormStats]:
    """A LeRobot folder's state and action statistics: from the normalizer files its processor
    JSON names, or, in exports older than the processor pipelines, from the weights' buffers."""
    files = [
        f
        for f in (
            processor_state_file(path, "policy_preprocessor.json", "normalizer_processor"),
            processor_state_file(path, "policy_postprocessor.json", "unnormalizer_processor"),
        )
        if f is not None
    ]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{path} lacks the normalizer file(s) its processor JSON names: {', '.join(missing)}.")
    try:
        return load_lerobot_norm_stats(files) if files else _legacy_lerobot_norm_stats(weight_files(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _legacy_lerobot_norm_stats(files: list[Path]) -> dict[str, NormStats]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for f in files:
        with open_safetensors(f) as sf:
            for key in sf.keys():
                if (m := LEGACY_LEROBOT_NORMALIZER.match(key)) and m.group(2) in _LEGACY_FEATURES:
                    # The input and the target normalizer both hold the action's statistics.
                    found.setdefault(_LEGACY_FEATURES[m.group(2)], {})[m.group(3)] = sf.get_tensor(key).float()
    return {feature: NormStats(**{n: t.numpy() for n, t in stats.items()}) for feature, stats in found.items()}


def weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map; re-export the sharded checkpoint.")
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {path}: {', '.join(missing)}.")
        return files
    single = path / WEIGHTS_FILE
    if not single.exists():
        raise CheckpointError(
            f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; it is not a safetensors checkpoint."
        )
    return [single]


def open_safetensors(file: Path):
    try:
        return safe_open(file, framework="pt")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); copy or export it again.") from None


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape from the safetensors headers, without reading any tensor data."""
    shapes = {}
    for f in files:
        with open_safetensors(f) as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with open_safetensors(f) as sf:
            try:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k)
            except SafetensorError as e:
                raise CheckpointError(f"{f} is truncated or corrupt ({e}); copy or export it again.") from None
    return tensors


def listing(keys: list[str], limit: int = 8) -> str:
    # Shallow keys first: a top-level head says more about a mismatch than layer 17's norm.
    keys = sorted(keys, key=lambda k: (k.count("."), k))
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Every tensor the model has, and no other, at the model's shapes; errors list the keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    kind = getattr(model, "display_name", type(model).__name__)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {listing(unexpected)}")
        raise CheckpointError(
            f"{source} does not match the {kind} architecture in its config.json: {'; '.join(parts)}."
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected[key].shape)}; the config and weights come from different models."
            )


def write_weights(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int | None = None) -> None:
    """model.safetensors, or shards of at most `max_shard_bytes` plus their index, each written atomically."""
    if max_shard_bytes is None:
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(path / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json_atomic(path / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def stats_dim(stats: NormStats | None) -> int | None:
    """The robot's dimension a feature's statistics describe, or None without statistics."""
    if stats is None:
        return None
    for arr in (stats.mean, stats.q01, stats.min):
        if arr is not None:
            return int(arr.shape[-1])
    return None


def write_lerobot_normalizers(
    path: Path, stats: dict[str, NormStats], normalizer_file: str, normalizer_features: tuple[str, ...]
) -> None:
    """LeRobot's processor pipelines as `lerobot_norm_stats` reads them: the preprocessor's
    normalizer holds `normalizer_features`, the postprocessor's unnormalizer the actions."""
    for pipeline, registry_name, state_file, features in (
        ("policy_preprocessor.json", "normalizer_processor", normalizer_file, normalizer_features),
        (
            "policy_postprocessor.json",
            "unnormalizer_processor",
            "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
            ("actions",),
        ),
    ):
        step = {"registry_name": registry_name, "state_file": state_file}
        write_json_atomic(path / pipeline, {"name": pipeline.removesuffix(".json"), "steps": [step]})
        save_lerobot_norm_stats(path / state_file, {k: v for k, v in stats.items() if k in features})


def copy_files(src: Path | None, dst: Path, names: tuple[str, ...]) -> None:
    """The named files of `src` that exist (tokenizers, processor configs) into `dst`, atomically."""
    if src is None:
        return
    for name in names:
        if (Path(src) / name).is_file():
            write_bytes_atomic(dst / name, (Path(src) / name).read_bytes())
