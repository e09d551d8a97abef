"""Sizes and settings of GR00T N1.5 (`nvidia/GR00T-N1.5-3B`).

The action head's numbers come from the checkpoint's config.json (`action_head_cfg`); the Eagle
2.5 backbone's (SigLIP-2 + Qwen3-1.7B) are fixed by NVIDIA's code, so config.json only names
them, except that this package also reads `backbone_cfg.vision_config` / `text_config` when a
checkpoint spells its sizes out (the small test and benchmark models do).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.qwen3 import Qwen3Config
from quantvla_ros.models.common.siglip import SiglipConfig

# `<IMG_CONTEXT>` in the Eagle 2.5 / Qwen3 tokenizer (its added_tokens.json).
IMG_CONTEXT_ID = 151_669
# Isaac-GR00T gr00t/data/embodiment_tags.py (N1.5) plus the two LeRobot v0.5.1 adds in
# processor_groot.py: the row of every per-embodiment weight tensor each robot uses.
EMBODIMENT_IDS = {
    "new_embodiment": 31,
    "oxe_droid": 17,
    "agibot_genie1": 26,
    "gr1": 24,
    "so100": 2,
    "unitree_g1": 3,
}


@dataclass(frozen=True)
class TransformerConfig:
    """A stack of diffusers BasicTransformerBlocks (the VL self-attention and the DiT)."""

    num_heads: int
    head_dim: int
    depth: int

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class GR00TConfig:
    vision: SiglipConfig = SiglipConfig()
    llm: Qwen3Config = Qwen3Config()
    vl_self_attention: TransformerConfig = TransformerConfig(num_heads=32, head_dim=64, depth=4)
    dit: TransformerConfig = TransformerConfig(num_heads=32, head_dim=48, depth=16)
    dit_output_dim: int = 1024
    hidden_size: int = 1024  # the per-embodiment MLPs' hidden width
    input_embedding_dim: int = 1536  # the DiT's token width
    action_dim: int = 32
    action_horizon: int = 16
    max_state_dim: int = 64
    num_steps: int = 4
    num_target_vision_tokens: int = 32  # the learned `future_tokens` between state and actions
    max_seq_len: int = 1024  # rows of `position_embedding`
    num_embodiments: int = 32
    embodiment_id: int = EMBODIMENT_IDS["new_embodiment"]
    num_timestep_buckets: int = 1000
    image_token_id: int = IMG_CONTEXT_ID
    camera_names: tuple[str, ...] = ("ego_view",)
    max_token_len: int = 384

    def __post_init__(self) -> None:
        if not 0 <= self.embodiment_id < self.num_embodiments:
            raise QuantVLAError(
                f"Embodiment id {self.embodiment_id} is outside the model's {self.num_embodiments} embodiment rows."
            )
        if self.vision.image_size % self.vision.patch_size:
            raise QuantVLAError("The image size must be a multiple of the patch size.")

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def tokens_per_image(self) -> int:
        # Eagle 2.5 in GR00T has no pixel shuffle: one LLM token per SigLIP patch.
        return self.vision.num_patches

    def with_changes(self, **changes: Any) -> GR00TConfig:
        return dataclasses.replace(self, **changes)


def prompt_budget(cameras: int, tokens_per_image: int, text_tokens: int = 128) -> int:
    """A max_token_len that fits the image tokens and chat template plus `text_tokens` of instruction."""
    return cameras * (tokens_per_image + 8) + text_tokens


def groot_n15_full(camera_names: tuple[str, ...] = ("ego_view",)) -> GR00TConfig:
    """The released GR00T-N1.5-3B."""
    return GR00TConfig(camera_names=camera_names, max_token_len=prompt_budget(len(camera_names), 256))


def groot_tiny(
    vocab_size: int = 512, image_token_id: int = 511, camera_names: tuple[str, ...] = ("front", "wrist")
) -> GR00TConfig:
    """A few-hundred-thousand-parameter GR00T with every structural feature (GQA, q/k norms, cross/self
    DiT blocks, several embodiments), for tests."""
    vision = SiglipConfig(image_size=28, patch_size=14, width=32, depth=2, num_heads=2, mlp_dim=64)
    return GR00TConfig(
        vision=vision,
        llm=Qwen3Config(width=64, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=vocab_size),
        vl_self_attention=TransformerConfig(num_heads=2, head_dim=32, depth=2),
        dit=TransformerConfig(num_heads=4, head_dim=12, depth=4),
        dit_output_dim=40,
        hidden_size=40,
        input_embedding_dim=48,
        action_dim=8,
        action_horizon=6,
        max_state_dim=12,
        num_target_vision_tokens=3,
        max_seq_len=16,
        num_embodiments=4,
        embodiment_id=2,
        image_token_id=image_token_id,
        camera_names=camera_names,
        max_token_len=prompt_budget(len(camera_names), vision.num_patches, text_tokens=48),
    )


def small_groot() -> GR00TConfig:
    """A few-million-parameter GR00T N1.5 for benchmarks, with every real input shape (1 camera at 224 px,
    horizon 16)."""
    vision = SiglipConfig(image_size=224, patch_size=14, width=96, depth=4, num_heads=4, mlp_dim=384)
    return GR00TConfig(
        vision=vision,
        llm=Qwen3Config(width=128, depth=4, mlp_dim=384, num_heads=4, num_kv_heads=2, head_dim=32, vocab_size=1024),
        vl_self_attention=TransformerConfig(num_heads=4, head_dim=32, depth=2),
        dit=TransformerConfig(num_heads=4, head_dim=32, depth=4),
        dit_output_dim=128,
        hidden_size=128,
        input_embedding_dim=128,
        image_token_id=1023,
        max_token_len=prompt_budget(1, vision.num_patches),
    )
