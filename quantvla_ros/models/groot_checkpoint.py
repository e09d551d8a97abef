"""The GR00T N1.5 family: checkpoints in NVIDIA's and LeRobot's layouts.

NVIDIA (Isaac-GR00T, `nvidia/GR00T-N1.5-3B` and its fine-tunes):
    config.json (`model_type: gr00t_n1_5`, backbone_cfg, action_head_cfg), model.safetensors or
    shards + model.safetensors.index.json, experiment_cfg/metadata.json:
    {embodiment_tag: {"statistics": {"state"|"action": {key: {min, max, mean, std, q01, q99}}},
                      "modalities": {"video": {camera: ...}, "state"|"action": {key: {shape, ...}}},
                      "embodiment_tag": tag}}
LeRobot v0.5.1 (`policies/groot`):
    model.safetensors with a `_groot_model.` key prefix, config.json with `type: groot`
    (embodiment_tag, input/output features); the min/max statistics live in the processor
    steps `groot_pack_inputs_v3` / `groot_action_unpack_unnormalize_v1` named by
    policy_preprocessor.json / policy_postprocessor.json.
Both need the Eagle 2.5 tokenizer files (vocab.json, merges.txt, added_tokens.json,
tokenizer_config.json, chat_template.json) in the folder.

Per-key statistics (state.left_arm, state.gripper, ...) are concatenated in the metadata's
modality order into one "state" and one "actions" vector, as GR00T concatenates the values;
both are normalized with min_max (the N1.5 data configs' choice for joint vectors, and what
LeRobot applies).

Keys are matched exactly, except the LM head (a tied copy of the embedding, which stands in for a
missing `embed_tokens`), a SigLIP pooling head and Qwen3 layers past `select_layer`: inference
never reads them. Isaac-GR00T pops those layers before saving, so N1.5 checkpoints hold 12.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import torch

from quantvla_ros.atomic import write_bytes_atomic, write_json_atomic
from quantvla_ros.models.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    CheckpointInfo,
    copy_files,
    processor_state_file,
    read_json,
    stats_dim,
    tensor_shapes,
    weight_files,
    write_weights,
)
from quantvla_ros.models.config import SiglipConfig
from quantvla_ros.models.family import ModelFamily
from quantvla_ros.models.groot import GR00TN15Model
from quantvla_ros.models.groot_config import EMBODIMENT_IDS, GR00TConfig, TransformerConfig, prompt_budget
from quantvla_ros.models.groot_processing import IMAGE_CONTEXT, TOKENIZER_FILES, EagleTokenizer, GR00TProcessor
from quantvla_ros.models.processing import NormStats
from quantvla_ros.models.qwen3 import Qwen3Config

METADATA_FILE = "experiment_cfg/metadata.json"
NVIDIA_MODEL_TYPE = "gr00t_n1_5"
LEROBOT_PREFIX = "_groot_model."
LEROBOT_PACK_STEP = "groot_pack_inputs_v3"
LEROBOT_UNPACK_STEP = "groot_action_unpack_unnormalize_v1"
# The Eagle processor's other files: not read here, copied so an artifact stays a complete checkpoint.
EAGLE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "generation_config.json")
SELECT_LAYER = 12  # backbone_cfg.select_layer of every released N1.5 checkpoint
STAT_NAMES = ("mean", "std", "q01", "q99", "min", "max")

_LLM = "backbone.eagle_model.language_model."
EMBED_TOKENS = _LLM + "model.embed_tokens.weight"
LM_HEAD = _LLM + "lm_head.weight"
IGNORED_KEYS = (
    re.compile(re.escape(LM_HEAD)),
    re.compile(r"backbone\.eagle_model\.vision_model\.vision_model\.head\..+"),
    re.compile(rf"{re.escape(_LLM)}model\.layers\.(\d+)\..+"),
)


def claims(raw: dict, path: Path) -> bool:
    return raw.get("model_type") == NVIDIA_MODEL_TYPE or raw.get("type") == "groot"


def _ignored(key: str) -> bool:
    for pattern in IGNORED_KEYS:
        match = pattern.fullmatch(key)
        if match and (not match.groups() or int(match.group(1)) >= SELECT_LAYER):
            return True
    return False


def canonical_key(key: str, layout: str) -> str:
    return key.removeprefix(LEROBOT_PREFIX) if layout == "lerobot" else key


def canonical_state_dict(raw: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint keys -> this model's keys; returns the state dict and the keys ignored on purpose."""
    out = {canonical_key(key, layout): tensor for key, tensor in raw.items()}
    if EMBED_TOKENS not in out and LM_HEAD in out:
        out[EMBED_TOKENS] = out[LM_HEAD]
    ignored = sorted(k for k in out if _ignored(k))
    for key in ignored:
        del out[key]
    return out, ignored


def export_state_dict(model: GR00TN15Model, layout: str) -> dict[str, torch.Tensor]:
    prefix = LEROBOT_PREFIX if layout == "lerobot" else ""
    return {prefix + key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}


# ---- config ----------------------------------------------------------------------------------
def _model_config(
    raw: dict, shapes: dict[str, tuple[int, ...]], cameras: tuple[str, ...], tag: str, image_token_id: int, source: Path
) -> GR00TConfig:
    backbone, head = raw.get("backbone_cfg") or {}, raw.get("action_head_cfg") or {}
    dit, vlsa = head.get("diffusion_model_cfg") or {}, head.get("vl_self_attention_cfg") or {}
    # Isaac-GR00T's transformer classes default positional_embeddings to "sinusoidal"; N1.5
    # configs set it to null, and a checkpoint that leaves it on computes something else.
    unsupported = [
        name
        for name, value, plain in (
            ("backbone_cfg.project_to_dim", backbone.get("project_to_dim"), None),
            ("action_head_cfg.use_vlln", head.get("use_vlln", True), True),
            ("action_head_cfg.add_pos_embed", head.get("add_pos_embed", True), True),
            ("diffusion_model_cfg.positional_embeddings", dit.get("positional_embeddings"), None),
            ("vl_self_attention_cfg.positional_embeddings", vlsa.get("positional_embeddings"), None),
        )
        if value != plain
    ]
    if unsupported:
        raise CheckpointError(
            f"{source} sets {', '.join(unsupported)} differently from GR00T N1.5; it is another model."
        )
    vision, text = backbone.get("vision_config") or {}, backbone.get("text_config") or {}
    v, q, base = SiglipConfig(), Qwen3Config(), GR00TConfig()
    vocab = shapes.get(EMBED_TOKENS, shapes.get(LM_HEAD, (q.vocab_size,)))[0]
    embodiments = int(head.get("max_num_embodiments", base.num_embodiments))
    ids = {**EMBODIMENT_IDS, **{k: int(i) for k, i in (raw.get("embodiment_ids") or {}).items()}}
    if tag not in ids:
        raise CheckpointError(
            f"Embodiment tag {tag!r} of {source} has no projector index in GR00T N1.5 "
            f"(known: {', '.join(sorted(ids))}); pass one of those as the asset id."
        )
    if ids[tag] >= embodiments:
        raise CheckpointError(f"Embodiment tag {tag!r} maps to row {ids[tag]}, but {source} has {embodiments} rows.")
    tokens_per_image = (int(vision.get("image_size", v.image_size)) // int(vision.get("patch_size", v.patch_size))) ** 2
    return GR00TConfig(
        vision=SiglipConfig(
            image_size=int(vision.get("image_size", v.image_size)),
            patch_size=int(vision.get("patch_size", v.patch_size)),
            width=int(vision.get("hidden_size", v.width)),
            depth=int(vision.get("num_hidden_layers", v.depth)),
            num_heads=int(vision.get("num_attention_heads", v.num_heads)),
            mlp_dim=int(vision.get("intermediate_size", v.mlp_dim)),
            eps=float(vision.get("layer_norm_eps", v.eps)),
        ),
        llm=Qwen3Config(
            width=int(text.get("hidden_size", q.width)),
            depth=int(backbone.get("select_layer", SELECT_LAYER)),
            mlp_dim=int(text.get("intermediate_size", q.mlp_dim)),
            num_heads=int(text.get("num_attention_heads", q.num_heads)),
            num_kv_heads=int(text.get("num_key_value_heads", q.num_kv_heads)),
            head_dim=int(text.get("head_dim", q.head_dim)),
            vocab_size=int(vocab),
            rope_theta=float(text.get("rope_theta", q.rope_theta)),
            eps=float(text.get("rms_norm_eps", q.eps)),
        ),
        vl_self_attention=TransformerConfig(
            num_heads=int(vlsa.get("num_attention_heads", base.vl_self_attention.num_heads)),
            head_dim=int(vlsa.get("attention_head_dim", base.vl_self_attention.head_dim)),
            depth=int(vlsa.get("num_layers", base.vl_self_attention.depth)),
        ),
        dit=TransformerConfig(
            num_heads=int(dit.get("num_attention_heads", base.dit.num_heads)),
            head_dim=int(dit.get("attention_head_dim", base.dit.head_dim)),
            depth=int(dit.get("num_layers", base.dit.depth)),
        ),
        dit_output_dim=int(dit.get("output_dim", base.dit_output_dim)),
        hidden_size=int(head.get("hidden_size", base.hidden_size)),
        input_embedding_dim=int(head.get("input_embedding_dim", base.input_embedding_dim)),
        action_dim=int(head.get("action_dim", raw.get("action_dim", base.action_dim))),
        action_horizon=int(head.get("action_horizon", raw.get("action_horizon", base.action_horizon))),
        max_state_dim=int(head.get("max_state_dim", base.max_state_dim)),
        num_steps=int(head.get("num_inference_timesteps", base.num_steps)),
        num_target_vision_tokens=int(head.get("num_target_vision_tokens", base.num_target_vision_tokens)),
        max_seq_len=int(head.get("max_seq_len", base.max_seq_len)),
        num_embodiments=embodiments,
        embodiment_id=ids[tag],
        num_timestep_buckets=int(head.get("num_timestep_buckets", base.num_timestep_buckets)),
        image_token_id=image_token_id,
        camera_names=cameras,
        max_token_len=int(raw.get("max_token_len", prompt_budget(len(cameras), tokens_per_image))),
    )


def _image_token_id(path: Path) -> int:
    # Loading the tokenizer here also turns missing tokenizer files into an error at read time.
    return int(EagleTokenizer.from_dir(path).tokenizer.token_to_id(IMAGE_CONTEXT))


def read_checkpoint(path: Path, raw: dict, asset_id: str | None = None) -> CheckpointInfo:
    layout = "lerobot" if raw.get("type") == "groot" else "nvidia"
    shapes = {canonical_key(k, layout): v for k, v in tensor_shapes(weight_files(path)).items()}
    try:
        if layout == "nvidia":
            return _read_nvidia(path, raw, shapes, asset_id)
        return _read_lerobot(path, raw, shapes, asset_id)
    except CheckpointError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{path / CONFIG_FILE} has an unusable field ({e}); compare it with a fresh export."
        ) from None


def _concat_stats(per_key: dict[str, dict], order: list[str], source: Path, modality: str) -> NormStats:
    missing = [k for k in order if k not in per_key]
    if missing:
        raise CheckpointError(f"{source} has no {modality} statistics for {', '.join(missing)}; re-export it.")
    merged = {}
    for name in STAT_NAMES:
        if all(per_key[k].get(name) is not None for k in order):
            merged[name] = np.concatenate([np.asarray(per_key[k][name], dtype=np.float32).reshape(-1) for k in order])
    return NormStats(**merged)


def _read_nvidia(path: Path, raw: dict, shapes: dict, asset_id: str | None) -> CheckpointInfo:
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
    stats = {
        name: _concat_stats(
            statistics.get(modality, {}), list(modalities.get(modality) or statistics.get(modality, {})), file, modality
        )
        for name, modality in (("state", "state"), ("actions", "action"))
    }
    cfg = _model_config(raw, shapes, cameras, tag, _image_token_id(path), path / CONFIG_FILE)
    return _info(path, "nvidia", cfg, stats, tag)


def _info(path: Path, layout: str, cfg: GR00TConfig, stats: dict[str, NormStats], tag: str) -> CheckpointInfo:
    return CheckpointInfo(
        path=path,
        layout=layout,
        config=cfg,
        norm_stats=stats,
        state_norm="min_max" if "state" in stats else None,
        action_norm="min_max" if "actions" in stats else None,
        state_dim=stats_dim(stats.get("state")),
        action_dim=stats_dim(stats.get("actions")),
        norm_eps=0.0,
        asset_id=tag,
    )


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


def _read_lerobot(path: Path, raw: dict, shapes: dict, asset_id: str | None) -> CheckpointInfo:
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
    cfg = _model_config(raw, shapes, cameras, tag, _image_token_id(path), path / CONFIG_FILE)
    return _info(path, "lerobot", cfg, stats, tag)


# ---- saving ----------------------------------------------------------------------------------
def _architecture(cfg: GR00TConfig) -> dict:
    """backbone_cfg / action_head_cfg as NVIDIA writes them, plus the backbone sizes spelled out."""
    v, q = cfg.vision, cfg.llm
    return {
        "backbone_cfg": {
            "select_layer": q.depth,
            "project_to_dim": None,
            "vision_config": {
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "hidden_size": v.width,
                "num_hidden_layers": v.depth,
                "num_attention_heads": v.num_heads,
                "intermediate_size": v.mlp_dim,
                "layer_norm_eps": v.eps,
            },
            "text_config": {
                "hidden_size": q.width,
                "intermediate_size": q.mlp_dim,
                "num_attention_heads": q.num_heads,
                "num_key_value_heads": q.num_kv_heads,
                "head_dim": q.head_dim,
                "rope_theta": q.rope_theta,
                "rms_norm_eps": q.eps,
            },
        },
        "action_head_cfg": {
            "action_dim": cfg.action_dim,
            "action_horizon": cfg.action_horizon,
            "max_state_dim": cfg.max_state_dim,
            "hidden_size": cfg.hidden_size,
            "input_embedding_dim": cfg.input_embedding_dim,
            "backbone_embedding_dim": q.width,
            "num_inference_timesteps": cfg.num_steps,
            "num_target_vision_tokens": cfg.num_target_vision_tokens,
            "max_seq_len": cfg.max_seq_len,
            "max_num_embodiments": cfg.num_embodiments,
            "num_timestep_buckets": cfg.num_timestep_buckets,
            "use_vlln": True,
            "add_pos_embed": True,
            "diffusion_model_cfg": {
                "num_attention_heads": cfg.dit.num_heads,
                "attention_head_dim": cfg.dit.head_dim,
                "num_layers": cfg.dit.depth,
                "output_dim": cfg.dit_output_dim,
                "cross_attention_dim": q.width,
                "interleave_self_attention": True,
                "norm_type": "ada_norm",
                "positional_embeddings": None,
            },
            "vl_self_attention_cfg": {
                "num_attention_heads": cfg.vl_self_attention.num_heads,
                "attention_head_dim": cfg.vl_self_attention.head_dim,
                "num_layers": cfg.vl_self_attention.depth,
                "positional_embeddings": None,
            },
        },
        "max_token_len": cfg.max_token_len,
    }


def _split_stats(norm_stats: dict[str, NormStats], modality: str) -> dict[str, NormStats]:
    return {k.removeprefix(f"{modality}."): s for k, s in norm_stats.items() if k.startswith(f"{modality}.")}


def _concat(per_key: dict[str, NormStats]) -> NormStats:
    names = [n for n in STAT_NAMES if all(getattr(s, n) is not None for s in per_key.values())]
    return NormStats(**{n: np.concatenate([getattr(s, n) for s in per_key.values()]) for n in names})


def _metadata(cfg: GR00TConfig, norm_stats: dict[str, NormStats], tag: str) -> dict:
    def stats_json(s: NormStats) -> dict:
        return {n: getattr(s, n).tolist() for n in STAT_NAMES if getattr(s, n) is not None}

    def layout(per_key: dict[str, NormStats]) -> dict:
        return {
            k: {"absolute": True, "rotation_type": None, "shape": [len(s.min)], "continuous": True}
            for k, s in per_key.items()
        }

    state, action = _split_stats(norm_stats, "state"), _split_stats(norm_stats, "action")
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


def _write_lerobot(path: Path, cfg: GR00TConfig, norm_stats: dict[str, NormStats], tag: str) -> None:
    if list(cfg.camera_names) != sorted(cfg.camera_names):
        raise ValueError(f"LeRobot's GR00T stacks cameras in sorted key order; name them so {cfg.camera_names} sorts.")
    state, action = _concat(_split_stats(norm_stats, "state")), _concat(_split_stats(norm_stats, "action"))
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
            **_architecture(cfg),
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
    if not _split_stats(stats, "state") or not _split_stats(stats, "action"):
        raise ValueError('save_groot needs "state.<key>" and "action.<key>" statistics; GR00T normalizes with them.')
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    write_weights(export_state_dict(model, layout), path, max_shard_bytes)
    if layout == "nvidia":
        write_json_atomic(
            path / CONFIG_FILE,
            {
                "model_type": NVIDIA_MODEL_TYPE,
                "architectures": ["GR00T_N1_5"],
                "action_dim": cfg.action_dim,
                "action_horizon": cfg.action_horizon,
                "compute_dtype": str(model.compute_dtype).removeprefix("torch."),
                **_architecture(cfg),
            },
        )
        write_json_atomic(path / METADATA_FILE, _metadata(cfg, stats, embodiment_tag))
    else:
        _write_lerobot(path, cfg, stats, embodiment_tag)
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
