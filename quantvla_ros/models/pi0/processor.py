"""π0 / π0.5 inputs: openpi's image geometry and the PaliGemma prompt (π0.5 writes the state into it).

Matches openpi's `image_tools.resize_with_pad`, its `PaligemmaTokenizer.tokenize` and the
PaliGemma state discretization.
"""

from __future__ import annotations

import functools
import hashlib
import logging

import numpy as np
from PIL import Image

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.checkpoint import CheckpointInfo
from quantvla_ros.models.common.images import image_to_model, stack_cameras
from quantvla_ros.models.common.tokenizer import PromptTokenizer, tokenizer_file
from quantvla_ros.models.pi0.config import PI0Config

logger = logging.getLogger(__name__)


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
        if not self.cfg.uses_discrete_state:
            tokens, mask = self._instruction_tokens(instruction)
            return tokens.copy(), mask.copy()
        # π0.5's prompt carries the state, which changes every inference; SentencePiece may merge
        # pieces across the instruction/state boundary, so the instruction's tokens cannot be
        # cached apart without departing from openpi's ids (the node bounds the instruction's length).
        return tokenize_prompt(self.tokenizer, instruction, self.cfg.max_token_len, discretize_state(state_norm))

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one processor per loaded policy; the instruction rarely changes
    def _instruction_tokens(self, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        return tokenize_prompt(self.tokenizer, instruction, self.cfg.max_token_len, None)

    def signature(self) -> dict:
        return {
            "image_size": self.cfg.image_size,
            "max_token_len": self.cfg.max_token_len,
            "discrete_state": self.cfg.uses_discrete_state,
            "tokenizer_sha256": self.tokenizer_sha256,
        }


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a uint8 H×W×3 image to height×width keeping its aspect ratio, padding with black.

    Same geometry as openpi (scale by the larger ratio, truncate the size, centre the padding with
    the odd pixel at the bottom/right). PIL's bilinear filter antialiases when shrinking, like the
    `jax.image.resize` openpi uses, so it is closer to openpi than an un-antialiased interpolate.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise QuantVLAError(
            f"resize_with_pad needs a uint8 H×W×3 RGB image, got shape {image.shape} and dtype {image.dtype}; "
            "convert the image to 8-bit RGB first."
        )
    cur_height, cur_width = image.shape[:2]
    if (cur_height, cur_width) == (height, width):
        return image.copy()
    ratio = max(cur_width / width, cur_height / height)
    # At least one pixel: an extreme aspect ratio would otherwise shrink a side to nothing.
    resized_height, resized_width = max(1, int(cur_height / ratio)), max(1, int(cur_width / ratio))
    resized = Image.fromarray(image).resize((resized_width, resized_height), Image.Resampling.BILINEAR)
    top = (height - resized_height) // 2
    left = (width - resized_width) // 2
    out = np.zeros((height, width, 3), dtype=np.uint8)
    out[top : top + resized_height, left : left + resized_width] = np.asarray(resized)
    return out


def discretize_state(state_norm: np.ndarray, bins: int = 256) -> np.ndarray:
    """Bin a normalized state into 0..bins-1 for the π0.5 prompt.

    Follows openpi without clipping, so values below -1 give -1 and values at or above 1 give
    bins-1, exactly as the released checkpoints saw during training.
    """
    return np.digitize(state_norm, np.linspace(-1.0, 1.0, bins + 1)[:-1]) - 1


_warned_truncation = False


def tokenize_prompt(
    tokenizer: PromptTokenizer, instruction: str, max_len: int, discrete_state: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """openpi's PaligemmaTokenizer.tokenize: int64 tokens and a bool mask, both right-padded to max_len.

    π0 (no state): "<bos>{text}" then "\\n" encoded on its own as the start-of-answer token.
    π0.5: "<bos>Task: {text}, State: {s0 s1 ...};\\nAction: " with the discretized state.
    """
    global _warned_truncation
    text = instruction.strip().replace("_", " ").replace("\n", " ")
    if discrete_state is None:
        ids = tokenizer.encode(text, add_bos=True) + tokenizer.encode("\n", add_bos=False)
    else:
        state = np.asarray(discrete_state)
        if state.ndim != 1 or not np.issubdtype(state.dtype, np.integer):
            raise ValueError(
                f"discrete_state must be a 1-D integer array, got shape {state.shape} and dtype {state.dtype}; "
                "pass the output of discretize_state."
            )
        state_str = " ".join(map(str, state.tolist()))
        ids = tokenizer.encode(f"Task: {text}, State: {state_str};\nAction: ", add_bos=True)
    if len(ids) > max_len:
        if not _warned_truncation:
            logger.warning(
                "The prompt has %d tokens and was cut to max_len=%d; raise the model's max token length "
                "if this happens often (shown once).",
                len(ids),
                max_len,
            )
            _warned_truncation = True
        ids = ids[:max_len]
    tokens = np.full(max_len, tokenizer.pad_id, dtype=np.int64)
    tokens[: len(ids)] = ids
    mask = np.arange(max_len) < len(ids)
    return tokens, mask
