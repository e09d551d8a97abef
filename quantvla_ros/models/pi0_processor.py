"""π0 / π0.5 inputs: openpi's image geometry and the PaliGemma prompt (π0.5 writes the state into it)."""

from __future__ import annotations

import hashlib

import numpy as np

from quantvla_ros.models.checkpoint import CheckpointInfo
from quantvla_ros.models.config import PI0Config
from quantvla_ros.models.processing import discretize_state, image_to_model, resize_with_pad, stack_cameras
from quantvla_ros.models.tokenizer import PromptTokenizer, tokenize_prompt, tokenizer_file


class PI0Processor:
    def __init__(self, cfg: PI0Config, tokenizer: PromptTokenizer, tokenizer_sha256: str) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tokenizer_sha256 = tokenizer_sha256

    @classmethod
    def from_checkpoint(cls, info: CheckpointInfo) -> PI0Processor:
        file = tokenizer_file(info.path)
        return cls(info.config, PromptTokenizer.from_dir(info.path), hashlib.sha256(file.read_bytes()).hexdigest())

    def images(self, images: dict[str, np.ndarray]) -> tuple[np.ndarray, list[bool]]:
        size = self.cfg.image_size

        def to_model(image: np.ndarray) -> np.ndarray:
            return image_to_model(resize_with_pad(image, size, size)).transpose(2, 0, 1)

        return stack_cameras(self.cfg.camera_names, images, size, to_model)

    def prompt(self, instruction: str, state_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        discrete = discretize_state(state_norm) if self.cfg.uses_discrete_state else None
        return tokenize_prompt(self.tokenizer, instruction, self.cfg.max_token_len, discrete)

    def signature(self) -> dict:
        return {
            "image_size": self.cfg.image_size,
            "max_token_len": self.cfg.max_token_len,
            "discrete_state": self.cfg.uses_discrete_state,
            "tokenizer_sha256": self.tokenizer_sha256,
        }
