"""The π0 / π0.5 family: checkpoints in the openpi-PyTorch and LeRobot layouts.

openpi (examples/convert_jax_model_to_pytorch.py):
    model.safetensors | model.safetensors.index.json + shards, config.json
    (paligemma_variant, action_expert_variant, action_dim, action_horizon, precision, ...),
    assets/<asset_id>/norm_stats.json
LeRobot (policies/pi0, policies/pi05):
    model.safetensors with a `model.` key prefix, config.json with `type: pi0|pi05`,
    policy_preprocessor.json / policy_postprocessor.json naming the normalizer safetensors.

Keys are matched exactly: a key the model lacks or a tensor the file lacks is an error that
lists them, except the few keys below that real checkpoints carry and inference never uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from quantvla_ros.atomic import write_bytes_atomic, write_json_atomic
from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.aloha import config_adapter
from quantvla_ros.models.common.checkpoint import (
    CONFIG_FILE,
    LEGACY_LEROBOT_NORMALIZER,
    CheckpointError,
    CheckpointInfo,
    copy_files,
    lerobot_norm_stats,
    lerobot_visual_normalization,
    refuse_settings,
    stats_dim,
    tensor_shapes,
    weight_files,
    write_lerobot_normalizers,
    write_weights,
)
from quantvla_ros.models.common.normalizer import STAT_NAMES, NormStats
from quantvla_ros.models.family import ModelFamily
from quantvla_ros.models.pi0.config import (
    PALIGEMMA_VOCAB_SIZE,
    PI0Config,
    resolve_gemma,
    resolve_siglip,
    variant_name,
)
from quantvla_ros.models.pi0.model import PI0Model
from quantvla_ros.models.pi0.processor import PI0Processor

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
LM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
EMBED_TOKENS = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"

# Present in real checkpoints, never read at inference: the LM head (tied to the embedding,
# used only for text generation) and the expert's unused LM head (lerobot #3109).
IGNORED_KEYS = (
    re.compile(r"^paligemma_with_expert\.paligemma\.lm_head\.weight$"),
    re.compile(r"^paligemma_with_expert\.gemma_expert\.lm_head\.weight$"),
    LEGACY_LEROBOT_NORMALIZER,
)

# transformers < 4.52 nested PaliGemma differently; older openpi/lerobot exports use these names.
LEGACY_PREFIXES = (
    ("paligemma_with_expert.paligemma.language_model.model.", "paligemma_with_expert.paligemma.model.language_model."),
    ("paligemma_with_expert.paligemma.language_model.lm_head.", "paligemma_with_expert.paligemma.lm_head."),
    ("paligemma_with_expert.paligemma.vision_tower.", "paligemma_with_expert.paligemma.model.vision_tower."),
    (
        "paligemma_with_expert.paligemma.multi_modal_projector.",
        "paligemma_with_expert.paligemma.model.multi_modal_projector.",
    ),
)

LEROBOT_NORM_MODES = {"MEAN_STD": "mean_std", "QUANTILES": "quantiles", "QUANTILE10": "quantiles", "IDENTITY": None}


def claims(raw: dict, path: Path) -> bool:
    """LeRobot's `type: pi0|pi05`, or openpi's config.json (no `type`, no `model_type`)."""
    return raw.get("type") in ("pi0", "pi05") or ("type" not in raw and "model_type" not in raw)


def _infer_pi05(shapes: dict[str, tuple[int, ...]]) -> bool:
    return any(k.endswith("time_mlp_in.weight") and "action_time" not in k for k in shapes)


def _vocab_size(shapes: dict[str, tuple[int, ...]]) -> int:
    for key in (EMBED_TOKENS, LM_HEAD):
        if key in shapes:
            return shapes[key][0]
    return PALIGEMMA_VOCAB_SIZE


def read_checkpoint(path: Path, raw: dict, asset_id: str | None = None) -> CheckpointInfo:
    layout = "lerobot" if "type" in raw else "openpi"
    shapes = {canonical_key(k, layout): v for k, v in tensor_shapes(weight_files(path)).items()}
    try:
        if layout == "openpi":
            return _read_openpi(path, raw, shapes, asset_id)
        return _read_lerobot(path, raw, shapes)
    except (TypeError, KeyError) as e:
        raise CheckpointError(
            f"{path / CONFIG_FILE} has an unusable field ({e}); compare it with a fresh export."
        ) from None


def _common_config(raw: dict, pi05: bool, shapes: dict) -> dict:
    return dict(
        pi05=pi05,
        llm=resolve_gemma(raw.get("paligemma_variant", "gemma_2b")),
        expert=resolve_gemma(raw.get("action_expert_variant", "gemma_300m")),
        vision=resolve_siglip(raw.get("vision_variant", "so400m_14_224")),
        vocab_size=_vocab_size(shapes),
    )


def _read_openpi(path: Path, raw: dict, shapes: dict, asset_id: str | None) -> CheckpointInfo:
    """openpi's convert_jax_model_to_pytorch.py writes action_dim, action_horizon, the two variants and
    precision (the stored weights' dtype; the compute dtype is the caller's); pi05, max_token_len,
    num_steps, camera_names and discrete_state_input are read when present (save_pi0 writes them),
    else openpi's defaults."""
    pi05 = bool(raw["pi05"]) if "pi05" in raw else _infer_pi05(shapes)
    cfg = PI0Config(
        **_common_config(raw, pi05, shapes),
        action_dim=int(raw.get("action_dim", 32)),
        action_horizon=int(raw.get("action_horizon", 50)),
        max_token_len=int(raw.get("max_token_len", 200 if pi05 else 48)),
        num_steps=int(raw.get("num_steps", 10)),
        camera_names=tuple(raw.get("camera_names", PI0Config.camera_names)),
        discrete_state_input=bool(raw.get("discrete_state_input", True)),
    )
    stats_files = sorted(path.glob("assets/*/norm_stats.json"))
    if asset_id is not None:
        stats_files = [f for f in stats_files if f.parent.name == asset_id]
        if not stats_files:
            raise CheckpointError(
                f"{path / 'assets' / asset_id / 'norm_stats.json'} does not exist; check the asset id."
            )
    if len(stats_files) > 1:
        ids = ", ".join(f.parent.name for f in stats_files)
        raise CheckpointError(
            f"{path / 'assets'} holds statistics for several robots ({ids}); choose one with asset_id."
        )
    stats = load_openpi_norm_stats(stats_files[0]) if stats_files else {}
    # openpi normalizes π0 with mean/std and everything newer with quantiles.
    mode = "quantiles" if pi05 else "mean_std"
    return CheckpointInfo(
        path=path,
        layout="openpi",
        config=cfg,
        norm_stats=stats,
        state_norm=mode if "state" in stats else None,
        action_norm=mode if "actions" in stats else None,
        state_dim=stats_dim(stats.get("state")),
        action_dim=stats_dim(stats.get("actions")),
        norm_eps=1e-6,
        asset_id=stats_files[0].parent.name if stats_files else None,
    )


def _read_lerobot(path: Path, raw: dict, shapes: dict) -> CheckpointInfo:
    """LeRobot's PI0Config / PI05Config (0.4 on) and the v0.3 PI0Config: the fields that change inputs
    or outputs are read or refused here (adapt_to_pi_aloha in aloha.py). Left unread on purpose:
    - checked by the weights' shapes: proj_width (v0.3), the π0 state width beyond max_action_dim;
    - no effect on the actions: n_obs_steps, n_action_steps (how many actions LeRobot's select_action
      plays; the Policy returns the whole chunk), rtc_config (steers only when a caller passes the
      previous chunk), use_cache and attention_implementation (v0.3), dtype, device,
      gradient_checkpointing, compile_model, compile_mode, action_feature_names;
      relative_exclude_joints and memory_* only act with use_relative_actions / the memory modes,
      which are refused;
    - training only: time_sampling_*, freeze_vision_encoder, train_expert_only, train_state_proj,
      optimizer_*, scheduler_*, rtc_training_max_delay;
    - Hub metadata: push_to_hub, repo_id, private, tags, license, pretrained_path.
    """
    pi05 = raw["type"] == "pi05"
    file = path / CONFIG_FILE
    inputs = raw.get("input_features", {})
    outputs = raw.get("output_features", {})
    common = _common_config(raw, pi05, shapes)
    size = common["vision"].image_size
    action_dim = int(raw.get("max_action_dim", 32))
    # v0.3 named the image size resize_imgs_with_padding (null: no resize), 0.4 on image_resolution.
    resize = "resize_imgs_with_padding" if "resize_imgs_with_padding" in raw else "image_resolution"
    settings = [
        lerobot_visual_normalization(raw),
        (resize, list(raw.get(resize) or [size, size]), [size, size]),
        ("use_relative_actions", raw.get("use_relative_actions", False), False),
        ("use_visual_memory", raw.get("use_visual_memory", False), False),
        ("use_proprioceptive_memory", raw.get("use_proprioceptive_memory", False), False),
    ]
    if not pi05:
        # π0 projects the state padded to max_state_dim; this package pads it as wide as the actions.
        settings.append(("max_state_dim", raw.get("max_state_dim", action_dim), action_dim))
    refuse_settings(file, settings, "this package runs π0 and π0.5 only with the supported values.")
    cameras = [k.removeprefix("observation.images.") for k, v in inputs.items() if v.get("type") == "VISUAL"]
    cameras += [f"empty_camera_{i}" for i in range(int(raw.get("empty_cameras", 0)))]
    cfg = PI0Config(
        **common,
        action_dim=action_dim,
        action_horizon=int(raw.get("chunk_size", 50)),
        max_token_len=int(raw.get("tokenizer_max_length", 200 if pi05 else 48)),
        # num_steps before LeRobot 0.4.
        num_steps=int(raw.get("num_inference_steps", raw.get("num_steps", 10))),
        camera_names=tuple(cameras) or PI0Config.camera_names,
        min_period=float(raw.get("min_period", PI0Config.min_period)),
        max_period=float(raw.get("max_period", PI0Config.max_period)),
    )
    stats = lerobot_norm_stats(path)
    mapping = raw.get("normalization_mapping", {})
    state_shape = inputs.get("observation.state", {}).get("shape")
    action_shape = outputs.get("action", {}).get("shape")
    state_dim = int(state_shape[0]) if state_shape else None
    out_dim = int(action_shape[0]) if action_shape else None
    return CheckpointInfo(
        path=path,
        layout="lerobot",
        config=cfg,
        norm_stats=stats,
        state_norm=_lerobot_mode(path, mapping.get("STATE", "QUANTILES" if pi05 else "MEAN_STD")),
        action_norm=_lerobot_mode(path, mapping.get("ACTION", "QUANTILES" if pi05 else "MEAN_STD")),
        state_dim=state_dim,
        action_dim=out_dim,
        norm_eps=1e-8,
        adapter=config_adapter(path, raw, state_dim, out_dim),
    )


def _lerobot_mode(path: Path, name: str) -> str | None:
    if name not in LEROBOT_NORM_MODES:
        raise CheckpointError(
            f"{path / CONFIG_FILE} asks for normalization {name!r}; supported are {', '.join(LEROBOT_NORM_MODES)}."
        )
    return LEROBOT_NORM_MODES[name]


# ---- weights -------------------------------------------------------------------------------
def canonical_key(key: str, layout: str) -> str:
    """A checkpoint key as this model names it."""
    if layout == "lerobot":
        key = key.removeprefix("model.")
    for old, new in LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def canonical_state_dict(raw: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint keys -> this model's keys; returns the state dict and the keys ignored on purpose."""
    out = {canonical_key(key, layout): tensor for key, tensor in raw.items()}
    # The token embedding is tied to the LM head; exports often keep only the head.
    if EMBED_TOKENS not in out and LM_HEAD in out:
        out[EMBED_TOKENS] = out[LM_HEAD]
    ignored = sorted(k for k in out if any(p.match(k) for p in IGNORED_KEYS))
    for k in ignored:
        del out[k]
    return out, ignored


# ---- saving --------------------------------------------------------------------------------
def export_state_dict(model: PI0Model, layout: str) -> dict[str, torch.Tensor]:
    """The model's tensors under the keys real checkpoints use (embedding stored as lm_head)."""
    out = {}
    for key, tensor in model.state_dict().items():
        key = LM_HEAD if key == EMBED_TOKENS else key
        out[("model." + key) if layout == "lerobot" else key] = tensor.detach().contiguous()
    return out


def _openpi_config(cfg: PI0Config, dtype: torch.dtype) -> dict:
    return {
        "action_dim": cfg.action_dim,
        "action_horizon": cfg.action_horizon,
        "paligemma_variant": variant_name(cfg.llm),
        "action_expert_variant": variant_name(cfg.expert),
        "vision_variant": variant_name(cfg.vision),
        "precision": str(dtype).removeprefix("torch."),
        "pi05": cfg.pi05,
        "max_token_len": cfg.max_token_len,
        "discrete_state_input": cfg.discrete_state_input,
        "num_steps": cfg.num_steps,
        "camera_names": list(cfg.camera_names),
    }


def _lerobot_config(cfg: PI0Config, dtype: torch.dtype, state_dim: int | None, action_dim: int | None) -> dict:
    image = [3, cfg.vision.image_size, cfg.vision.image_size]
    inputs = {f"observation.images.{c}": {"type": "VISUAL", "shape": image} for c in cfg.camera_names}
    inputs["observation.state"] = {"type": "STATE", "shape": [state_dim or cfg.action_dim]}
    mode = "QUANTILES" if cfg.pi05 else "MEAN_STD"
    return {
        "type": "pi05" if cfg.pi05 else "pi0",
        "paligemma_variant": variant_name(cfg.llm),
        "action_expert_variant": variant_name(cfg.expert),
        "vision_variant": variant_name(cfg.vision),
        "dtype": str(dtype).removeprefix("torch."),
        "chunk_size": cfg.action_horizon,
        "n_action_steps": cfg.action_horizon,
        "max_state_dim": cfg.action_dim,
        "max_action_dim": cfg.action_dim,
        "num_inference_steps": cfg.num_steps,
        "min_period": cfg.min_period,
        "max_period": cfg.max_period,
        "tokenizer_max_length": cfg.max_token_len,
        "image_resolution": [cfg.vision.image_size, cfg.vision.image_size],
        "input_features": inputs,
        "output_features": {"action": {"type": "ACTION", "shape": [action_dim or cfg.action_dim]}},
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode},
    }


def save_pi0(
    model: PI0Model,
    path: Path | str,
    layout: str = "openpi",
    norm_stats: dict[str, NormStats] | None = None,
    tokenizer_dir: Path | None = None,
    asset_id: str = "robot",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a checkpoint folder that `registry.load_model` (and openpi / LeRobot) read back."""
    if layout not in ("openpi", "lerobot"):
        raise ValueError(f"Unknown checkpoint layout {layout!r}; use 'openpi' or 'lerobot'.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    dtype = model.compute_dtype
    write_weights(export_state_dict(model, layout), path, max_shard_bytes)
    stats = norm_stats or {}
    state_dim = stats_dim(stats.get("state"))
    action_dim = stats_dim(stats.get("actions"))
    if layout == "openpi":
        write_json_atomic(path / CONFIG_FILE, _openpi_config(cfg, dtype))
        if stats:
            save_openpi_norm_stats(path / "assets" / asset_id / "norm_stats.json", stats)
    else:
        write_json_atomic(path / CONFIG_FILE, _lerobot_config(cfg, dtype, state_dim, action_dim))
        write_lerobot_normalizers(
            path, stats, "policy_preprocessor_step_2_normalizer_processor.safetensors", ("state",)
        )
    copy_files(tokenizer_dir, path, TOKENIZER_FILES)
    return path


PI0_FAMILY = ModelFamily(
    name=PI0Model.FAMILY,
    claims=claims,
    read_checkpoint=read_checkpoint,
    build_model=PI0Model,
    canonical_state_dict=canonical_state_dict,
    export_state_dict=export_state_dict,
    make_processor=PI0Processor.from_checkpoint,
    side_files=(
        CONFIG_FILE,
        *TOKENIZER_FILES,
        "policy_preprocessor.json",
        "policy_postprocessor.json",
        "*normalizer_processor.safetensors",
        "assets/*/norm_stats.json",
    ),
)


def load_openpi_norm_stats(path: Path) -> dict[str, NormStats]:
    """Read openpi's `{"norm_stats": {"state": {"mean": [...], ...}, "actions": {...}}}`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise QuantVLAError(f"Norm stats file {path} does not exist; check the checkpoint folder.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantVLAError(f"Norm stats file {path} is not valid JSON ({e}); re-export it.") from None
    entries = data.get("norm_stats") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise QuantVLAError(
            f'Norm stats file {path} has no "norm_stats" object; expected openpi\'s norm_stats.json layout.'
        )
    stats = {}
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not any(entry.get(name) is not None for name in STAT_NAMES):
            raise QuantVLAError(
                f'Entry "{key}" in norm stats file {path} has none of {", ".join(STAT_NAMES)}; re-export it.'
            )
        try:
            stats[key] = NormStats(**{name: entry.get(name) for name in STAT_NAMES})
        except (TypeError, ValueError):
            raise QuantVLAError(
                f'Entry "{key}" in norm stats file {path} holds non-numeric values; re-export it.'
            ) from None
    return stats


def save_openpi_norm_stats(path: Path, stats: dict[str, NormStats]) -> None:
    """Write stats in openpi's norm_stats.json layout, leaving out missing fields."""
    entries = {
        key: {name: getattr(s, name).tolist() for name in STAT_NAMES if getattr(s, name) is not None}
        for key, s in stats.items()
    }
    write_bytes_atomic(Path(path), json.dumps({"norm_stats": entries}, indent=2).encode())
