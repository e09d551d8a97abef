"""GR00T N1.5 checkpoints in NVIDIA's layout (Isaac-GR00T, `nvidia/GR00T-N1.5-3B` and its fine-tunes):

config.json (`model_type: gr00t_n1_5`, backbone_cfg, action_head_cfg), model.safetensors or
shards + model.safetensors.index.json, experiment_cfg/metadata.json:
{embodiment_tag: {"statistics": {"state"|"action": {key: {min, max, mean, std, q01, q99}}},
                  "modalities": {"video": {camera: ...}, "state"|"action": {key: {shape, ...}}},
                  "embodiment_tag": tag}}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantvla_ros.atomic import write_json_atomic
from quantvla_ros.models.common.checkpoint import CONFIG_FILE, CheckpointError, CheckpointInfo, read_json
from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.groot.checkpoint import (
    STAT_NAMES,
    architecture,
    checkpoint_info,
    image_token_id,
    model_config,
    split_stats,
)
from quantvla_ros.models.groot.config import GR00TConfig

METADATA_FILE = "experiment_cfg/metadata.json"
NVIDIA_MODEL_TYPE = "gr00t_n1_5"


def _metadata_stats(per_key: dict[str, dict], order: list[str], source: Path, modality: str) -> NormStats:
    missing = [k for k in order if k not in per_key]
    if missing:
        raise CheckpointError(f"{source} has no {modality} statistics for {', '.join(missing)}; re-export it.")
    merged = {}
    for name in STAT_NAMES:
        if all(per_key[k].get(name) is not None for k in order):
            merged[name] = np.concatenate([np.asarray(per_key[k][name], dtype=np.float32).reshape(-1) for k in order])
    return NormStats(**merged)


def read_nvidia(path: Path, raw: dict, shapes: dict, asset_id: str | None) -> CheckpointInfo:
    file = path / METADATA_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing; GR00T keeps its embodiment statistics there, so copy the whole checkpoint folder."
        )
    metadata = read_json(file)
    if asset_id is not None and asset_id not in metadata:
        raise CheckpointError(f"{file} has no embodiment {asset_id!r}; it holds {', '.join(sorted(metadata))}.")
    if asset_id is None and len(metadata) != 1:
        raise CheckpointError(
            f"{file} holds statistics for several embodiments ({', '.join(sorted(metadata))}); choose one as asset_id."
        )
    tag = asset_id or next(iter(metadata))
    entry = metadata[tag]
    modalities, statistics = entry.get("modalities", {}), entry.get("statistics", {})
    cameras = tuple(modalities.get("video", {}))
    if not cameras:
        raise CheckpointError(f"{file} lists no video modality for {tag!r}; GR00T needs its camera names.")
    order = {m: list(modalities.get(m) or statistics.get(m, {})) for m in ("state", "action")}
    stats = {
        name: _metadata_stats(statistics.get(modality, {}), order[modality], file, modality)
        for name, modality in (("state", "state"), ("actions", "action"))
    }
    cfg = model_config(raw, shapes, cameras, tag, image_token_id(path), path / CONFIG_FILE)
    info = checkpoint_info(path, "nvidia", cfg, stats, tag)
    info.action_names = _dimension_names(statistics.get("action", {}), order["action"])
    return info


def _dimension_names(per_key: dict[str, dict], order: list[str]) -> tuple[str, ...] | None:
    """Each action dimension by its modality key ("arm[0]", ..., "gripper"), in the model's order."""
    sizes = [len(np.asarray(per_key[k].get("min", []), dtype=np.float32).reshape(-1)) for k in order]
    names = tuple(k if n == 1 else f"{k}[{i}]" for k, n in zip(order, sizes, strict=True) for i in range(n))
    return names or None


def _metadata(cfg: GR00TConfig, norm_stats: dict[str, NormStats], tag: str) -> dict:
    def stats_json(s: NormStats) -> dict:
        return {n: getattr(s, n).tolist() for n in STAT_NAMES if getattr(s, n) is not None}

    def layout(per_key: dict[str, NormStats]) -> dict:
        return {
            k: {"absolute": True, "rotation_type": None, "shape": [len(s.min)], "continuous": True}
            for k, s in per_key.items()
        }

    state, action = split_stats(norm_stats, "state"), split_stats(norm_stats, "action")
    size = [cfg.image_size, cfg.image_size]
    return {
        tag: {
            "statistics": {
                "state": {k: stats_json(s) for k, s in state.items()},
                "action": {k: stats_json(s) for k, s in action.items()},
            },
            "modalities": {
                "video": {c: {"resolution": size, "channels": 3, "fps": 30.0} for c in cfg.camera_names},
                "state": layout(state),
                "action": layout(action),
            },
            "embodiment_tag": tag,
        }
    }


def write_nvidia(path: Path, cfg: GR00TConfig, compute_dtype: str, norm_stats: dict[str, NormStats], tag: str) -> None:
    """config.json and experiment_cfg/metadata.json beside the weights."""
    config = {
        "model_type": NVIDIA_MODEL_TYPE,
        "architectures": ["GR00T_N1_5"],
        "action_dim": cfg.action_dim,
        "action_horizon": cfg.action_horizon,
        "compute_dtype": compute_dtype,
        **architecture(cfg),
    }
    write_json_atomic(path / CONFIG_FILE, config)
    write_json_atomic(path / METADATA_FILE, _metadata(cfg, norm_stats, tag))
