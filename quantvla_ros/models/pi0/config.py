"""Sizes and settings of the π0 / π0.5 family.

Variant names follow openpi (`gemma_2b`, `gemma_300m`, `dummy`); a checkpoint's config.json
may also spell a variant out as a dict of `GemmaConfig` / `SiglipConfig` fields, which is how
the project's own small policies record their widths.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.gemma import GemmaConfig
from quantvla_ros.models.common.siglip import SiglipConfig

PALIGEMMA_VOCAB_SIZE = 257152
OPENPI_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "dummy": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "tiny_llm": GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
    "tiny_expert": GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
}

SIGLIP_VARIANTS: dict[str, SiglipConfig] = {
    "so400m_14_224": SiglipConfig(),
    "tiny_siglip": SiglipConfig(image_size=28, patch_size=14, width=32, depth=2, num_heads=2, mlp_dim=64),
}


@dataclass(frozen=True)
class PI0Config:
    """One π0 or π0.5 model: architecture plus the inference settings stored with it."""

    pi05: bool
    llm: GemmaConfig = GEMMA_VARIANTS["gemma_2b"]
    expert: GemmaConfig = GEMMA_VARIANTS["gemma_300m"]
    vision: SiglipConfig = SIGLIP_VARIANTS["so400m_14_224"]
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 48
    num_steps: int = 10
    camera_names: tuple[str, ...] = OPENPI_CAMERAS
    # openpi's pi05_libero feeds the state through the π0-style prompt instead of the text.
    discrete_state_input: bool = True
    min_period: float = 4e-3  # of the sincos time embedding (openpi's; LeRobot's config may set them)
    max_period: float = 4.0

    def __post_init__(self) -> None:
        if self.llm.depth != self.expert.depth:
            raise QuantVLAError(
                f"The LLM has {self.llm.depth} layers and the action expert {self.expert.depth}; "
                "joint attention needs the same depth in both."
            )
        if (self.llm.num_heads, self.llm.num_kv_heads, self.llm.head_dim) != (
            self.expert.num_heads,
            self.expert.num_kv_heads,
            self.expert.head_dim,
        ):
            raise QuantVLAError("The LLM and the action expert must share head count, KV head count and head_dim.")

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def max_state_dim(self) -> int:
        # π0 pads state and actions to the same width.
        return self.action_dim

    @property
    def uses_discrete_state(self) -> bool:
        return self.pi05 and self.discrete_state_input

    def with_changes(self, **changes: Any) -> PI0Config:
        return dataclasses.replace(self, **changes)


def resolve_gemma(variant: str | dict) -> GemmaConfig:
    if isinstance(variant, dict):
        return GemmaConfig(**variant)
    if variant not in GEMMA_VARIANTS:
        raise QuantVLAError(
            f"Unknown Gemma variant {variant!r}; use one of {sorted(GEMMA_VARIANTS)} or a dict of sizes."
        )
    return GEMMA_VARIANTS[variant]


def resolve_siglip(variant: str | dict) -> SiglipConfig:
    if isinstance(variant, dict):
        return SiglipConfig(**variant)
    if variant not in SIGLIP_VARIANTS:
        raise QuantVLAError(
            f"Unknown SigLIP variant {variant!r}; use one of {sorted(SIGLIP_VARIANTS)} or a dict of sizes."
        )
    return SIGLIP_VARIANTS[variant]


def variant_name(cfg: GemmaConfig | SiglipConfig) -> str | dict:
    """The name to write back into config.json: a known name, else the spelled-out sizes."""
    table = GEMMA_VARIANTS if isinstance(cfg, GemmaConfig) else SIGLIP_VARIANTS
    for name, known in table.items():
        if known == cfg:
            return name
    return dataclasses.asdict(cfg)


def pi0_full() -> PI0Config:
    return PI0Config(pi05=False, max_token_len=48)


def pi05_full() -> PI0Config:
    return PI0Config(pi05=True, max_token_len=200)


def tiny(pi05: bool, vocab_size: int = 512) -> PI0Config:
    """A few-thousand-parameter model with every architectural feature, for tests."""
    return PI0Config(
        pi05=pi05,
        llm=GEMMA_VARIANTS["tiny_llm"],
        expert=GEMMA_VARIANTS["tiny_expert"],
        vision=SIGLIP_VARIANTS["tiny_siglip"],
        vocab_size=vocab_size,
        action_dim=8,
        action_horizon=5,
        max_token_len=64 if pi05 else 16,
        num_steps=3,
        camera_names=("base_0_rgb", "left_wrist_0_rgb"),
    )


def small_pi05() -> PI0Config:
    """A few-million-parameter π0.5 with every real input shape (3 cameras at 224 px), for benchmarks."""
    return PI0Config(
        pi05=True,
        llm=GemmaConfig(width=128, depth=4, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=32),
        expert=GemmaConfig(width=64, depth=4, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=32),
        vision=SiglipConfig(image_size=224, patch_size=14, width=96, depth=4, num_heads=4, mlp_dim=384),
        action_dim=32,
        action_horizon=10,
        max_token_len=64,
        num_steps=10,
    )
