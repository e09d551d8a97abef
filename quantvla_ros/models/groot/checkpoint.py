"""What both GR00T N1.5 checkpoint layouts share: weight keys, the architecture in config.json,
per-key statistics and the description of a checkpoint. `nvidia.py` and `lerobot.py` read and
write their own files over this; `family.py` picks between them.

Keys are matched exactly, except the LM head (a tied copy of the embedding, which stands in for a
missing `embed_tokens`), a SigLIP pooling head and Qwen3 layers past `select_layer`: inference
never reads them. Isaac-GR00T pops those layers before saving, so N1.5 checkpoints hold 12.

Per-key statistics (state.left_arm, state.gripper, ...) are concatenated in the metadata's
modality order into one "state" and one "actions" vector, as GR00T concatenates the values;
both are normalized with min_max (the N1.5 data configs' choice for joint vectors, and what
LeRobot applies). Both layouts need the Eagle 2.5 tokenizer files (vocab.json, merges.txt,
added_tokens.json, tokenizer_config.json, chat_template.json) in the folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from quantvla_ros.models.common.checkpoint import CheckpointError, CheckpointInfo, refuse_settings, stats_dim
from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.common.qwen3 import Qwen3Config
from quantvla_ros.models.common.siglip import SiglipConfig
from quantvla_ros.models.groot.config import EMBODIMENT_IDS, GR00TConfig, TransformerConfig, prompt_budget
from quantvla_ros.models.groot.model import GR00TN15Model
from quantvla_ros.models.groot.processor import IMAGE_CONTEXT, EagleTokenizer

LEROBOT_PREFIX = "_groot_model."
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
def model_config(
    raw: dict, shapes: dict[str, tuple[int, ...]], cameras: tuple[str, ...], tag: str, image_token_id: int, source: Path
) -> GR00TConfig:
    """The architecture from NVIDIA's backbone_cfg / action_head_cfg (a LeRobot config.json has none: its
    weights are N1.5's, the defaults here). What changes the computation is read or refused, with
    Isaac-GR00T's defaults for absent keys. Left unread on purpose:
    - checked by the weights' keys and shapes: backbone_embedding_dim, diffusion_model_cfg's
      cross_attention_dim, attention_bias and norm_elementwise_affine, backbone_cfg.eagle_path;
    - no effect on the actions: compute_dtype, model_dtype, backbone_cfg.load_bf16 and
      use_flash_attention (the dtype is the caller's), upcast_attention, num_embeds_ada_norm and
      max_num_positional_embeddings (only used with positional embeddings, which are refused);
    - training only: tune_llm, tune_visual, tune_projector, tune_diffusion_model, noise_beta_alpha,
      noise_beta_beta, noise_s, dropout, final_dropout, expand_batch, freeze_decode_layer,
      load_pretrained_det_decode_layer_path, detection_coeff.
    """
    backbone, head = raw.get("backbone_cfg") or {}, raw.get("action_head_cfg") or {}
    dit, vlsa = head.get("diffusion_model_cfg") or {}, head.get("vl_self_attention_cfg") or {}
    # Isaac-GR00T's transformer classes default positional_embeddings to "sinusoidal" and
    # interleave_self_attention to false; N1.5 configs set them to null and true.
    settings = [
        ("backbone_cfg.project_to_dim", backbone.get("project_to_dim"), None),
        ("backbone_cfg.reproject_vision", backbone.get("reproject_vision", False), False),
        ("action_head_cfg.use_vlln", head.get("use_vlln", True), True),
        ("action_head_cfg.add_pos_embed", head.get("add_pos_embed", True), True),
    ]
    for name, stack in (("diffusion_model_cfg", dit), ("vl_self_attention_cfg", vlsa)):
        settings += [
            (f"{name}.positional_embeddings", stack.get("positional_embeddings"), None),
            (f"{name}.activation_fn", stack.get("activation_fn", "gelu-approximate"), "gelu-approximate"),
            (f"{name}.norm_eps", stack.get("norm_eps", 1e-5), 1e-5),
        ]
    if dit:
        settings += [
            ("diffusion_model_cfg.interleave_self_attention", dit.get("interleave_self_attention", False), True),
            ("diffusion_model_cfg.norm_type", dit.get("norm_type", "ada_norm"), "ada_norm"),
        ]
    refuse_settings(source, settings, "GR00T N1.5 sets them so, and other values make another model.")
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


def image_token_id(path: Path) -> int:
    # Loading the tokenizer here also turns missing tokenizer files into an error at read time.
    return int(EagleTokenizer.from_dir(path).tokenizer.token_to_id(IMAGE_CONTEXT))


def checkpoint_info(path: Path, layout: str, cfg: GR00TConfig, stats: dict[str, NormStats], tag: str) -> CheckpointInfo:
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


# ---- saving ----------------------------------------------------------------------------------
def architecture(cfg: GR00TConfig) -> dict:
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


def split_stats(norm_stats: dict[str, NormStats], modality: str) -> dict[str, NormStats]:
    return {k.removeprefix(f"{modality}."): s for k, s in norm_stats.items() if k.startswith(f"{modality}.")}


def concat_stats(per_key: dict[str, NormStats]) -> NormStats:
    names = [n for n in STAT_NAMES if all(getattr(s, n) is not None for s in per_key.values())]
    return NormStats(**{n: np.concatenate([getattr(s, n) for s in per_key.values()]) for n in names})
