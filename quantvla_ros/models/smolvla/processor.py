"""SmolVLA inputs as LeRobot prepares them: top/left-padded images and the SmolVLM2 prompt.

Images (`SmolVLAPolicy.prepare_images`): uint8 -> [0, 1] floats, bilinear resize without
antialiasing keeping the aspect ratio, black padding on the top and left, then ×2−1. A camera
the observation lacks becomes a −1 image with mask False. (LeRobot drops missing cameras beyond
`empty_cameras` instead; masked tokens do not move anyone's position, so both give the same
actions.)

Prompt (`NewLineTaskProcessorStep` + `TokenizerProcessorStep`): the instruction with a "\\n"
appended unless it ends with one, tokenized by the SmolVLM2 `tokenizer.json` with its own
post-processor (SmolVLM2's adds no BOS), truncated on the side `tokenizer_config.json` names,
right-padded to max_token_len. LeRobot pads only to the longest prompt of the batch; padding
slots are masked out, so the extra padding changes nothing.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.checkpoint import CheckpointError, CheckpointInfo, read_json
from quantvla_ros.models.common.images import stack_cameras
from quantvla_ros.models.common.tokenizer import special_token_content
from quantvla_ros.models.smolvla.config import SMOLVLM2_500M, SmolVLAConfig

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def resize_with_pad_top_left(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 H×W×3 -> float32 3×size×size in [0, 1], padded with black on the top and left."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise QuantVLAError(
            f"SmolVLA needs uint8 H×W×3 RGB images, got shape {image.shape} and dtype {image.dtype}; "
            "convert the image to 8-bit RGB first."
        )
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    height, width = image.shape[:2]
    if (height, width) != (size, size):
        ratio = max(width / size, height / size)
        # At least one pixel: an extreme aspect ratio would otherwise shrink a side to nothing.
        resized_height, resized_width = max(1, int(height / ratio)), max(1, int(width / ratio))
        pixels = F.interpolate(pixels, size=(resized_height, resized_width), mode="bilinear", align_corners=False)
        pixels = F.pad(pixels, (size - resized_width, 0, size - resized_height, 0), value=0.0)
    return pixels[0].numpy()


@dataclass(frozen=True)
class SmolVLMPromptTokenizer:
    tokenizer: tokenizers.Tokenizer
    pad_id: int
    truncate_left: bool
    sha256: str  # of tokenizer.json and tokenizer_config.json, which together decide the ids

    @classmethod
    def from_dir(cls, path: Path) -> SmolVLMPromptTokenizer:
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise CheckpointError(
                f"{path} has no {TOKENIZER_FILE}; copy {TOKENIZER_FILE} and {TOKENIZER_CONFIG_FILE} of "
                f"{SMOLVLM2_500M} (the tokenizer SmolVLA was trained with) into it."
            )
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise CheckpointError(f"{file} is not a valid tokenizer.json ({e}); copy it again.") from None
        config_file = path / TOKENIZER_CONFIG_FILE
        config = read_json(config_file) if config_file.is_file() else {}
        pad = special_token_content(config.get("pad_token"))
        pad_id = tokenizer.token_to_id(pad) if pad is not None else None
        digest = hashlib.sha256(file.read_bytes())
        digest.update(config_file.read_bytes() if config_file.is_file() else b"")
        return cls(
            tokenizer=tokenizer,
            pad_id=0 if pad_id is None else pad_id,
            truncate_left=config.get("truncation_side") == "left",
            sha256=digest.hexdigest(),
        )

    def tokenize(self, instruction: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """int64 tokens [max_len] and their bool mask, right-padded."""
        text = instruction if instruction.endswith("\n") else instruction + "\n"
        ids = self.tokenizer.encode(text).ids
        if len(ids) > max_len:
            ids = ids[-max_len:] if self.truncate_left else ids[:max_len]
        tokens = np.full(max_len, self.pad_id, dtype=np.int64)
        tokens[: len(ids)] = ids
        return tokens, np.arange(max_len) < len(ids)


class SmolVLAProcessor:
    def __init__(self, cfg: SmolVLAConfig, tokenizer: SmolVLMPromptTokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer

    @classmethod
    def from_checkpoint(cls, info: CheckpointInfo) -> SmolVLAProcessor:
        return cls(info.config, SmolVLMPromptTokenizer.from_dir(info.path))

    def images(self, images: dict[str, np.ndarray]) -> tuple[np.ndarray, list[bool]]:
        size = self.cfg.image_size
        return stack_cameras(
            self.cfg.camera_names, images, size, lambda image: resize_with_pad_top_left(image, size) * 2.0 - 1.0
        )

    def prompt(self, instruction: str, state_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The state reaches SmolVLA through its own prefix token, never through the text, so the
        # tokens depend on the instruction alone and are computed once per instruction.
        tokens, mask = self._tokens(instruction)
        return tokens.copy(), mask.copy()

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one processor per loaded policy; the instruction rarely changes
    def _tokens(self, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenizer.tokenize(instruction, self.cfg.max_token_len)

    def signature(self) -> dict:
        return {
            "image_size": self.cfg.image_size,
            "image_padding": "top_left",
            "max_token_len": self.cfg.max_token_len,
            "tokenizer_sha256": self.tokenizer.sha256,
        }
