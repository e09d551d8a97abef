"""GR00T N1.5 checkpoints in LeRobot v0.5.1's layout (`policies/groot`):

model.safetensors with a `_groot_model.` key prefix, config.json with `type: groot`
(embodiment_tag, input/output features); the min/max statistics live in the processor
steps `groot_pack_inputs_v3` / `groot_action_unpack_unnormalize_v1` named by
policy_preprocessor.json / policy_postprocessor.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from quantvla_ros.atomic import write_bytes_atomic, write_json_atomic
from quantvla_ros.models.common.checkpoint import CONFIG_FILE, CheckpointError, CheckpointInfo, processor_state_file
from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.groot.checkpoint import (
    STAT_NAMES,
    architecture,
    checkpoint_info,
    concat_stats,
    image_token_id,
    model_config,
    split_stats,
)
from quantvla_ros.models.groot.config import GR00TConfig

LEROBOT_PACK_STEP = "groot_pack_inputs_v3"
LEROBOT_UNPACK_STEP = "groot_action_unpack_unnormalize_v1"


def _read_lerobot_stats(files: list[Path]) -> dict[str, NormStats]:
    features = {"observation.state": "state", "action": "actions"}
    merged: dict[str, dict] = {}
    for file in files:
        try:
            tensors = safetensors.numpy.load(file.read_bytes())
        except (OSError, safetensors.SafetensorError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); copy it again.") from None
        for key, array in tensors.items():
            feature, _, stat = key.rpartition(".")
            if feature in features and stat in STAT_NAMES:
                merged.setdefault(features[feature], {})[stat] = array
    return {name: NormStats(**values) for name, values in merged.items()}


def read_lerobot(path: Path, raw: dict, shapes: dict, asset_id: str | None) -> CheckpointInfo:
    """LeRobot's GrootConfig: embodiment_tag and the VISUAL input_features are read here, the statistics
    from the processor steps, the architecture by model_config. Left unread on purpose:
    - not read by LeRobot's GR00T at inference either: chunk_size (the head's action_horizon rules),
      normalization_mapping (its pipeline always uses min/max), image_size (its Eagle processor sizes
      the images);
    - checked by the weights' shapes: max_state_dim, max_action_dim;
    - no effect on the actions: n_obs_steps, n_action_steps (the Policy returns the whole chunk),
      use_bf16 (the dtype is the caller's), base_model_path and tokenizer_assets_repo (where LeRobot
      downloads from; the files are in the folder here);
    - training only: tune_*, lora_*, optimizer_*, warmup_ratio, video_backend, balance_*_weights,
      dataset_paths, output_dir, save_steps, max_steps, batch_size, dataloader_num_workers, report_to,
      resume.
    """
    tag = asset_id or raw.get("embodiment_tag", "new_embodiment")
    inputs = raw.get("input_features", {})
    # LeRobot's pack step stacks the cameras in sorted key order.
    cameras = tuple(
        sorted(k.removeprefix("observation.images.") for k, v in inputs.items() if v.get("type") == "VISUAL")
    )
    if not cameras:
        raise CheckpointError(f"{path / CONFIG_FILE} declares no VISUAL input feature; GR00T needs its cameras.")
    files = [
        f
        for f in (
            processor_state_file(path, "policy_preprocessor.json", LEROBOT_PACK_STEP),
            processor_state_file(path, "policy_postprocessor.json", LEROBOT_UNPACK_STEP),
        )
        if f is not None
    ]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path} lacks the statistics file(s) its processor JSON names: {', '.join(missing)}.")
    stats = _read_lerobot_stats(files)
    for name in stats:
        if stats[name].min is None or stats[name].max is None:
            raise CheckpointError(f"{path}: the {name} statistics have no min/max, which GR00T normalizes with.")
    cfg = model_config(raw, shapes, cameras, tag, image_token_id(path), path / CONFIG_FILE)
    return checkpoint_info(path, "lerobot", cfg, stats, tag)


def write_lerobot(path: Path, cfg: GR00TConfig, norm_stats: dict[str, NormStats], tag: str) -> None:
    if list(cfg.camera_names) != sorted(cfg.camera_names):
        raise ValueError(f"LeRobot's GR00T stacks cameras in sorted key order; name them so {cfg.camera_names} sorts.")
    state, action = concat_stats(split_stats(norm_stats, "state")), concat_stats(split_stats(norm_stats, "action"))
    image = [3, cfg.image_size, cfg.image_size]
    inputs = {f"observation.images.{c}": {"type": "VISUAL", "shape": image} for c in cfg.camera_names}
    inputs["observation.state"] = {"type": "STATE", "shape": [len(state.min)]}
    write_json_atomic(
        path / CONFIG_FILE,
        {
            "type": "groot",
            "embodiment_tag": tag,
            "base_model_path": "nvidia/GR00T-N1.5-3B",
            "chunk_size": cfg.action_horizon,
            "n_action_steps": cfg.action_horizon,
            "max_state_dim": cfg.max_state_dim,
            "max_action_dim": cfg.action_dim,
            "input_features": inputs,
            "output_features": {"action": {"type": "ACTION", "shape": [len(action.min)]}},
            **architecture(cfg),
        },
    )
    steps = (
        ("policy_preprocessor", 2, LEROBOT_PACK_STEP, {"observation.state": state, "action": action}),
        ("policy_postprocessor", 0, LEROBOT_UNPACK_STEP, {"action": action}),
    )
    for pipeline, index, step, features in steps:
        state_file = f"{pipeline}_step_{index}_{step}.safetensors"
        tensors = {
            f"{feature}.{n}": np.ascontiguousarray(getattr(s, n))
            for feature, s in features.items()
            for n in STAT_NAMES
            if getattr(s, n) is not None
        }
        write_bytes_atomic(path / state_file, safetensors.numpy.save(tensors))
        write_json_atomic(
            path / f"{pipeline}.json",
            {"name": pipeline, "steps": [{"registry_name": step, "config": {}, "state_file": state_file}]},
        )
