"""The SmolVLA family: LeRobot checkpoint folders (`lerobot/smolvla_base` and its fine-tunes).

    config.json                  `type: smolvla`, chunk_size, max_state_dim, max_action_dim,
                                 num_steps, num_vlm_layers, expert_width_multiplier,
                                 self_attn_every_n_layers, attention_mode, resize_imgs_with_padding,
                                 tokenizer_max_length, vlm_model_name, input/output_features,
                                 normalization_mapping, adapt_to_pi_aloha (aloha.py), ...
    model.safetensors            keys `model.` + this model's module names
    policy_preprocessor.json     names its normalizer safetensors (the step index varies)
    policy_postprocessor.json    names the unnormalizer safetensors
    tokenizer.json (+ tokenizer_config.json)
                                 not part of a LeRobot export, which downloads the SmolVLM2
                                 tokenizer from the Hub; copy them in (nothing here downloads)

Keys are matched exactly, except these that checkpoints carry and inference never reads: the
VLM's LM head and the text model's final norm (SmolVLA only takes K/V from the text layers),
and text layers past the kept ones (LeRobot cuts the text model before saving, so a current
export has none; the count kept equals the expert's depth).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from quantvla_ros.atomic import write_json_atomic
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
from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.family import ModelFamily
from quantvla_ros.models.smolvla.config import SmolVLAConfig, resolve_vlm, vlm_name
from quantvla_ros.models.smolvla.model import SmolVLAModel
from quantvla_ros.models.smolvla.processor import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, SmolVLAProcessor

PREFIX = "model."
EMBED_TOKENS = "vlm_with_expert.vlm.model.text_model.embed_tokens.weight"
LM_HEAD = "vlm_with_expert.vlm.lm_head.weight"
_TEXT_LAYER = re.compile(r"^vlm_with_expert\.vlm\.model\.text_model\.layers\.(\d+)\.")
_EXPERT_LAYER = re.compile(r"^vlm_with_expert\.lm_expert\.layers\.(\d+)\.")
UNUSED_KEYS = (LM_HEAD, "vlm_with_expert.vlm.model.text_model.norm.weight")

PREPROCESSOR = "policy_preprocessor.json"
POSTPROCESSOR = "policy_postprocessor.json"
# LeRobot's smolvla pipelines: rename, batch, newline, tokenizer, device, then the normalizer (step 5).
NORMALIZER_FILE = "policy_preprocessor_step_5_normalizer_processor.safetensors"
NORM_MODES = {"MEAN_STD": "mean_std", "QUANTILES": "quantiles", "IDENTITY": None}
IMAGE_PREFIXES = ("observation.images.", "observation.")


def claims(raw: dict, path: Path) -> bool:
    return raw.get("type") == "smolvla"


def _camera_names(raw: dict) -> tuple[str, ...]:
    inputs = raw.get("input_features") or {}
    names = []
    for key, feature in inputs.items():
        if feature.get("type") == "VISUAL":
            prefix = next(p for p in (*IMAGE_PREFIXES, "") if key.startswith(p))
            names.append(key.removeprefix(prefix))
    # LeRobot's validate_features adds these to the inputs at training time; older configs may lack them.
    names += [f"empty_camera_{i}" for i in range(int(raw.get("empty_cameras", 0))) if f"empty_camera_{i}" not in names]
    return tuple(names) or SmolVLAConfig.camera_names


def _config(path: Path, raw: dict, shapes: dict[str, tuple[int, ...]]) -> SmolVLAConfig:
    """LeRobot's SmolVLAConfig fields that change inputs or outputs are read here (or by read_checkpoint
    and aloha.py) or refused. Left unread on purpose:
    - no effect on the actions: n_obs_steps (SmolVLA reads one observation), n_action_steps (how many
      actions of a chunk LeRobot's select_action plays; the Policy returns the whole chunk, as
      predict_action_chunk does), use_cache (LeRobot cannot denoise without it; the prefix K/V is always
      cached here), prefix_length and pad_language_to (they add masked tokens that take no position),
      rtc_config (real-time chunking steers only when a caller passes the previous chunk), device,
      use_amp, compile_model, compile_mode;
    - training only: load_vlm_weights, freeze_vision_encoder, fine_tune_vision_encoder,
      vision_encoder_lr_multiplier, train_expert_only, train_state_proj, optimizer_*, scheduler_*;
    - Hub metadata: push_to_hub, repo_id, private, tags, license, pretrained_path.
    """
    file = path / CONFIG_FILE
    try:
        vlm = resolve_vlm(raw.get("vlm_model_name"), raw.get("vlm_config"))
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}.") from None
    embed = shapes.get(PREFIX + EMBED_TOKENS) or shapes.get(PREFIX + LM_HEAD)
    if embed is not None:
        vlm = dataclasses.replace(vlm, vocab_size=embed[0])
    num_vlm_layers = int(raw.get("num_vlm_layers", 16))
    if num_vlm_layers <= 0:
        num_vlm_layers = vlm.text.depth
    if int(raw.get("num_expert_layers", -1)) not in (-1, 0, num_vlm_layers):
        raise CheckpointError(
            f"{file} sets num_expert_layers={raw['num_expert_layers']}; this package runs SmolVLA only with "
            "one expert layer per VLM layer (num_expert_layers -1)."
        )
    if raw.get("add_image_special_tokens", False):
        raise CheckpointError(
            f"{file} sets add_image_special_tokens, which this package does not support; use a checkpoint "
            "trained without it."
        )
    refuse_settings(file, [lerobot_visual_normalization(raw)], "this package feeds SmolVLA unnormalized images.")
    size = vlm.vision.image_size
    resize = raw.get("resize_imgs_with_padding")
    if resize is not None and list(resize) != [size, size]:
        raise CheckpointError(
            f"{file} resizes images to {list(resize)} but the vision tower takes {size}×{size}; "
            "this package runs SmolVLA only at the tower's own resolution."
        )
    return SmolVLAConfig(
        vlm=vlm,
        num_vlm_layers=num_vlm_layers,
        expert_width_multiplier=float(raw.get("expert_width_multiplier", 0.75)),
        self_attn_every_n_layers=int(raw.get("self_attn_every_n_layers", 2)),
        cross_attention="cross" in raw.get("attention_mode", "cross_attn"),
        action_dim=int(raw.get("max_action_dim", 32)),
        max_state_dim=int(raw.get("max_state_dim", 32)),
        action_horizon=int(raw.get("chunk_size", 50)),
        num_steps=int(raw.get("num_steps", 10)),
        max_token_len=int(raw.get("tokenizer_max_length", 48)),
        camera_names=_camera_names(raw),
        min_period=float(raw.get("min_period", 4e-3)),
        max_period=float(raw.get("max_period", 4.0)),
    )


def _norm_mode(path: Path, name: str) -> str | None:
    if name not in NORM_MODES:
        raise CheckpointError(
            f"{path / CONFIG_FILE} asks for normalization {name!r}; supported are {', '.join(NORM_MODES)}."
        )
    return NORM_MODES[name]


def read_checkpoint(path: Path, raw: dict, asset_id: str | None = None) -> CheckpointInfo:
    """Everything but the weights; `asset_id` does not apply (LeRobot keeps one robot's statistics)."""
    shapes = tensor_shapes(weight_files(path))
    try:
        cfg = _config(path, raw, shapes)
        inputs = raw.get("input_features") or {}
        outputs = raw.get("output_features") or {}
        state_shape = inputs.get("observation.state", {}).get("shape")
        action_shape = outputs.get("action", {}).get("shape")
        mapping = raw.get("normalization_mapping") or {}
        state_norm = _norm_mode(path, mapping.get("STATE", "MEAN_STD"))
        action_norm = _norm_mode(path, mapping.get("ACTION", "MEAN_STD"))
    except CheckpointError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{path / CONFIG_FILE} has an unusable field ({e}); compare it with a fresh export."
        ) from None
    stats = lerobot_norm_stats(path)
    state_dim = int(state_shape[0]) if state_shape else None
    action_dim = int(action_shape[0]) if action_shape else None
    return CheckpointInfo(
        path=path,
        layout="lerobot",
        config=cfg,
        norm_stats=stats,
        state_norm=state_norm,
        action_norm=action_norm,
        state_dim=state_dim,
        action_dim=action_dim,
        norm_eps=1e-8,
        adapter=config_adapter(path, raw, state_dim, action_dim),
    )


# ---- weights -------------------------------------------------------------------------------
def canonical_state_dict(raw: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """File keys -> this model's keys (LeRobot's `model.` prefix removed); also the keys ignored on purpose."""
    out = {key.removeprefix(PREFIX): tensor for key, tensor in raw.items()}
    expert_depth = 1 + max((int(m.group(1)) for k in out if (m := _EXPERT_LAYER.match(k))), default=-1)
    ignored = sorted(
        k
        for k in out
        if k in UNUSED_KEYS
        or LEGACY_LEROBOT_NORMALIZER.match(k)
        or ((m := _TEXT_LAYER.match(k)) and expert_depth > 0 and int(m.group(1)) >= expert_depth)
    )
    for k in ignored:
        del out[k]
    return out, ignored


def export_state_dict(model: SmolVLAModel, layout: str) -> dict[str, torch.Tensor]:
    return {PREFIX + key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}


# ---- saving --------------------------------------------------------------------------------
def _lerobot_config(cfg: SmolVLAConfig, state_dim: int | None, action_dim: int | None) -> dict:
    size = cfg.image_size
    inputs = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, size, size]} for c in cfg.camera_names}
    inputs["observation.state"] = {"type": "STATE", "shape": [state_dim or cfg.max_state_dim]}
    vlm = vlm_name(cfg.vlm)
    return {
        "type": "smolvla",
        "n_obs_steps": 1,
        "input_features": inputs,
        "output_features": {"action": {"type": "ACTION", "shape": [action_dim or cfg.action_dim]}},
        "chunk_size": cfg.action_horizon,
        "n_action_steps": cfg.action_horizon,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
        "max_state_dim": cfg.max_state_dim,
        "max_action_dim": cfg.action_dim,
        "resize_imgs_with_padding": [size, size],
        "empty_cameras": 0,
        "tokenizer_max_length": cfg.max_token_len,
        "num_steps": cfg.num_steps,
        "use_cache": True,
        **({"vlm_model_name": vlm} if isinstance(vlm, str) else {"vlm_config": vlm}),
        "add_image_special_tokens": False,
        "attention_mode": "cross_attn" if cfg.cross_attention else "self_attn",
        "prefix_length": -1,
        "pad_language_to": "longest",
        "num_expert_layers": -1,
        "num_vlm_layers": cfg.num_vlm_layers,
        "self_attn_every_n_layers": cfg.self_attn_every_n_layers,
        "expert_width_multiplier": cfg.expert_width_multiplier,
        "min_period": cfg.min_period,
        "max_period": cfg.max_period,
    }


def save_smolvla(
    model: SmolVLAModel,
    path: Path | str,
    norm_stats: dict[str, NormStats],
    tokenizer_dir: Path | None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a LeRobot-layout SmolVLA folder that `registry.load_model` reads back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_weights(export_state_dict(model, "lerobot"), path, max_shard_bytes)
    state_dim, action_dim = stats_dim(norm_stats.get("state")), stats_dim(norm_stats.get("actions"))
    write_json_atomic(path / CONFIG_FILE, _lerobot_config(model.cfg, state_dim, action_dim))
    # As LeRobot writes them: the normalizer holds every feature's statistics, the unnormalizer the actions'.
    write_lerobot_normalizers(path, norm_stats, NORMALIZER_FILE, ("state", "actions"))
    copy_files(tokenizer_dir, path, (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE))
    return path


SMOLVLA_FAMILY = ModelFamily(
    name=SmolVLAModel.FAMILY,
    claims=claims,
    read_checkpoint=read_checkpoint,
    build_model=SmolVLAModel,
    canonical_state_dict=canonical_state_dict,
    export_state_dict=export_state_dict,
    make_processor=SmolVLAProcessor.from_checkpoint,
    side_files=(
        CONFIG_FILE,
        TOKENIZER_FILE,
        TOKENIZER_CONFIG_FILE,
        PREPROCESSOR,
        POSTPROCESSOR,
        "*normalizer_processor.safetensors",
    ),
)
