"""Sizes and settings of LeRobot's SmolVLA.

A LeRobot SmolVLA config.json names its backbone (`vlm_model_name`, a SmolVLM2 checkpoint on
the Hub) instead of spelling out its sizes, so the known backbones are tabulated here. A
config.json may instead carry a `vlm_config` dict of `SmolVLMConfig` fields, which is how the
project's own small test policies record their widths.

The action expert is derived from the backbone exactly as LeRobot's `SmolVLMWithExpertModel`
does: a copy of the text config at `expert_width_multiplier` × the width, with LLaMA's
intermediate-size rule, one layer per kept VLM layer, and the same heads and head_dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.siglip import SiglipConfig

SMOLVLM2_500M = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"


@dataclass(frozen=True)
class SmolLMConfig:
    """A LLaMA-style decoder (SmolLM2): RMSNorm, SiLU-gated MLP, grouped-query attention."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float = 1e-5


@dataclass(frozen=True)
class SmolVLMConfig:
    """The SmolVLM backbone: SigLIP tower, pixel-shuffle connector and SmolLM2 text model."""

    vision: SiglipConfig
    text: SmolLMConfig
    scale_factor: int  # the connector's pixel shuffle folds scale_factor² patches into one token
    vocab_size: int

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches // self.scale_factor**2


VLM_VARIANTS: dict[str, SmolVLMConfig] = {
    SMOLVLM2_500M: SmolVLMConfig(
        vision=SiglipConfig(image_size=512, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
        text=SmolLMConfig(width=960, depth=32, mlp_dim=2560, num_heads=15, num_kv_heads=5, head_dim=64),
        scale_factor=4,
        vocab_size=49280,
    ),
    "tiny_smolvlm": SmolVLMConfig(
        vision=SiglipConfig(image_size=32, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32),
        text=SmolLMConfig(width=48, depth=6, mlp_dim=96, num_heads=6, num_kv_heads=2, head_dim=8),
        scale_factor=2,
        vocab_size=512,
    ),
}


def expert_mlp_dim(width: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """LLaMA's FFN size rule, as LeRobot's `get_intermediate_size`: 4·(2/3)·width rounded up to 256."""
    hidden = int(multiplier * int(2 * width / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class SmolVLAConfig:
    """One SmolVLA model: architecture plus the inference settings stored with it."""

    vlm: SmolVLMConfig = VLM_VARIANTS[SMOLVLM2_500M]
    num_vlm_layers: int = 16  # LeRobot keeps only the first layers of the text model
    expert_width_multiplier: float = 0.75
    # With cross attention, expert layer i self-attends when i % n == 0 and cross-attends otherwise.
    self_attn_every_n_layers: int = 2
    cross_attention: bool = True  # LeRobot's attention_mode "cross_attn"; False = every layer self-attends
    action_dim: int = 32  # max_action_dim: actions are zero-padded to it
    max_state_dim: int = 32
    action_horizon: int = 50  # chunk_size
    num_steps: int = 10
    max_token_len: int = 48  # tokenizer_max_length
    camera_names: tuple[str, ...] = ("camera1", "camera2", "camera3")
    min_period: float = 4e-3  # of the sincos time embedding
    max_period: float = 4.0

    def __post_init__(self) -> None:
        if not 0 < self.num_vlm_layers <= self.vlm.text.depth:
            raise QuantVLAError(
                f"num_vlm_layers={self.num_vlm_layers} must be between 1 and the text model's "
                f"{self.vlm.text.depth} layers."
            )

    @property
    def image_size(self) -> int:
        return self.vlm.vision.image_size

    @property
    def text(self) -> SmolLMConfig:
        """The text model as SmolVLA runs it: cut to its first num_vlm_layers layers."""
        return dataclasses.replace(self.vlm.text, depth=self.num_vlm_layers)

    @property
    def expert(self) -> SmolLMConfig:
        width = int(self.vlm.text.width * self.expert_width_multiplier)
        return dataclasses.replace(self.text, width=width, mlp_dim=expert_mlp_dim(width))

    def is_cross_layer(self, index: int) -> bool:
        n = self.self_attn_every_n_layers
        return self.cross_attention and not (n > 0 and index % n == 0)

    def with_changes(self, **changes: Any) -> SmolVLAConfig:
        return dataclasses.replace(self, **changes)


def resolve_vlm(name: str | None, spelled_out: dict | None) -> SmolVLMConfig:
    """The backbone from config.json's `vlm_config` dict, else from its `vlm_model_name`."""
    if spelled_out is not None:
        return SmolVLMConfig(
            vision=SiglipConfig(**spelled_out["vision"]),
            text=SmolLMConfig(**spelled_out["text"]),
            scale_factor=int(spelled_out["scale_factor"]),
            vocab_size=int(spelled_out["vocab_size"]),
        )
    name = name or SMOLVLM2_500M
    if name not in VLM_VARIANTS:
        raise QuantVLAError(
            f"vlm_model_name {name!r} is not a backbone this package knows ({', '.join(VLM_VARIANTS)}); "
            "spell out its sizes as a vlm_config dict"
        )
    return VLM_VARIANTS[name]


def vlm_name(vlm: SmolVLMConfig) -> str | dict:
    """What to write back into config.json: a known name, else the spelled-out sizes."""
    for name, known in VLM_VARIANTS.items():
        if known == vlm:
            return name
    return dataclasses.asdict(vlm)


def smolvla_full() -> SmolVLAConfig:
    """`lerobot/smolvla_base`'s architecture."""
    return SmolVLAConfig()


def smolvla_tiny(vocab_size: int = 512) -> SmolVLAConfig:
    """A quarter-million-parameter SmolVLA with every structural feature (GQA, pixel shuffle,
    a truncated text model, alternating self/cross expert layers, the state token), for tests."""
    vlm = dataclasses.replace(VLM_VARIANTS["tiny_smolvlm"], vocab_size=vocab_size)
    return SmolVLAConfig(
        vlm=vlm,
        num_vlm_layers=4,
        action_dim=8,
        max_state_dim=8,
        num_steps=3,
        max_token_len=16,
        camera_names=("camera1", "camera2"),
    )


def small_smolvla() -> SmolVLAConfig:
    """A few-million-parameter SmolVLA for benchmarks, with every real input shape (3 cameras at 512 px,
    48 prompt slots)."""
    vlm = SmolVLMConfig(
        vision=SiglipConfig(image_size=512, patch_size=16, width=96, depth=4, num_heads=4, mlp_dim=384),
        text=SmolLMConfig(width=128, depth=4, mlp_dim=384, num_heads=4, num_kv_heads=2, head_dim=32),
        scale_factor=4,
        vocab_size=1024,
    )
    return SmolVLAConfig(vlm=vlm, num_vlm_layers=4)
