"""The GR00T N1.5 family entry: checkpoints in NVIDIA's layout (`nvidia.py`) or LeRobot's
(`lerobot.py`), read and written through one `ModelFamily`."""

from __future__ import annotations

from pathlib import Path

from quantvla_ros.models.common.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    CheckpointInfo,
    copy_files,
    tensor_shapes,
    weight_files,
    write_weights,
)
from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.family import ModelFamily
from quantvla_ros.models.groot.checkpoint import (
    EAGLE_PROCESSOR_FILES,
    canonical_key,
    canonical_state_dict,
    export_state_dict,
    split_stats,
)
from quantvla_ros.models.groot.lerobot import LEROBOT_PACK_STEP, LEROBOT_UNPACK_STEP, read_lerobot, write_lerobot
from quantvla_ros.models.groot.model import GR00TN15Model
from quantvla_ros.models.groot.nvidia import NVIDIA_MODEL_TYPE, read_nvidia, write_nvidia
from quantvla_ros.models.groot.processor import TOKENIZER_FILES, GR00TProcessor


def claims(raw: dict, path: Path) -> bool:
    return raw.get("model_type") == NVIDIA_MODEL_TYPE or raw.get("type") == "groot"


def read_checkpoint(path: Path, raw: dict, asset_id: str | None = None) -> CheckpointInfo:
    layout = "lerobot" if raw.get("type") == "groot" else "nvidia"
    shapes = {canonical_key(k, layout): v for k, v in tensor_shapes(weight_files(path)).items()}
    try:
        if layout == "nvidia":
            return read_nvidia(path, raw, shapes, asset_id)
        return read_lerobot(path, raw, shapes, asset_id)
    except CheckpointError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{path / CONFIG_FILE} has an unusable field ({e}); compare it with a fresh export."
        ) from None


def save_groot(
    model: GR00TN15Model,
    path: Path | str,
    layout: str = "nvidia",
    norm_stats: dict[str, NormStats] | None = None,
    tokenizer_dir: Path | None = None,
    embodiment_tag: str = "new_embodiment",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a checkpoint folder that `registry.load_model` reads back.

    norm_stats holds GR00T's per-key statistics, keyed "state.<key>" / "action.<key>" in the
    robot's concatenation order, with at least min and max.
    """
    if layout not in ("nvidia", "lerobot"):
        raise ValueError(f"Unknown GR00T checkpoint layout {layout!r}; use 'nvidia' or 'lerobot'.")
    stats = norm_stats or {}
    if not split_stats(stats, "state") or not split_stats(stats, "action"):
        raise ValueError('save_groot needs "state.<key>" and "action.<key>" statistics; GR00T normalizes with them.')
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    write_weights(export_state_dict(model, layout), path, max_shard_bytes)
    if layout == "nvidia":
        write_nvidia(path, cfg, str(model.compute_dtype).removeprefix("torch."), stats, embodiment_tag)
    else:
        write_lerobot(path, cfg, stats, embodiment_tag)
    copy_files(tokenizer_dir, path, TOKENIZER_FILES)
    return path


GROOT_FAMILY = ModelFamily(
    name=GR00TN15Model.FAMILY,
    claims=claims,
    read_checkpoint=read_checkpoint,
    build_model=GR00TN15Model,
    canonical_state_dict=canonical_state_dict,
    export_state_dict=export_state_dict,
    make_processor=GR00TProcessor.from_checkpoint,
    side_files=(
        CONFIG_FILE,
        *TOKENIZER_FILES,
        *EAGLE_PROCESSOR_FILES,
        "experiment_cfg/*",
        "policy_preprocessor.json",
        "policy_postprocessor.json",
        f"*{LEROBOT_PACK_STEP}.safetensors",
        f"*{LEROBOT_UNPACK_STEP}.safetensors",
    ),
)
