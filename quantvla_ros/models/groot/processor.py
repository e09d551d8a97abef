"""GR00T N1.5 inputs: Isaac-GR00T's eval video transforms and the Eagle 2.5 chat prompt, each as
the checkpoint's layout was trained with.

Images (Isaac-GR00T `data/transform/video.py`, the N1.5 data configs, the Eagle processor):
VideoCrop(scale 0.95) as a centre crop, VideoResize to 224 (bilinear, antialiased), then
mean = std = 0.5, i.e. [0, 255] -> [-1, 1]. Every camera is an input; GR00T has no image mask.
NVIDIA's pipeline crops and resizes pixels as floats in [0, 1] and truncates them back to uint8
(VideoToNumpy's `(x * 255).to(uint8)`), so an NVIDIA-layout checkpoint gets exactly that. A
LeRobot-layout one gets the same crop and resize done on the 8-bit image, which rounds; LeRobot
v0.5.1's own pipeline instead hands the uncropped image to its Eagle processor, which resizes it
bicubic to a size set in a processor config this package has not verified.

Prompt: one user turn holding every image and then the text, rendered with the checkpoint's chat
template (add_generation_prompt); the Eagle processor then replaces each `<image-k>` with
`<image k><img>` + `<IMG_CONTEXT>` × 256 + `</img>`. The Qwen tokenizer pads on the left. The
text is the instruction itself for the NVIDIA layout (Isaac-GR00T's GR00TTransform and
Gr00tPolicy) and `str([instruction])` (`"['pick the cup']"`) for the LeRobot layout (LeRobot's
GrootEagleEncodeStep), one or two tokens apart.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.checkpoint import CheckpointError, CheckpointInfo, read_json
from quantvla_ros.models.common.images import image_to_model
from quantvla_ros.models.common.tokenizer import special_token_content
from quantvla_ros.models.groot.config import GR00TConfig

VOCAB_FILE, MERGES_FILE, TOKENIZER_JSON = "vocab.json", "merges.txt", "tokenizer.json"
ADDED_TOKENS_FILE, TOKENIZER_CONFIG_FILE = "added_tokens.json", "tokenizer_config.json"
SPECIAL_TOKENS_FILE, CHAT_TEMPLATE_FILE = "special_tokens_map.json", "chat_template.json"
TOKENIZER_FILES = (
    VOCAB_FILE,
    MERGES_FILE,
    TOKENIZER_JSON,
    ADDED_TOKENS_FILE,
    TOKENIZER_CONFIG_FILE,
    SPECIAL_TOKENS_FILE,
    CHAT_TEMPLATE_FILE,
)
IMAGE_START, IMAGE_END, IMAGE_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# HF's Qwen2 fast tokenizer (transformers convert_slow_tokenizer.Qwen2Converter): this split, then
# byte-level BPE without a prefix space, NFC-normalized.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CROP_SCALE = 0.95
_MEDIA_PLACEHOLDER = re.compile(r"<image-(\d+)>")


def qwen_byte_level(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Give a BPE model Qwen2's normalizer, pre-tokenizer and decoder."""
    tok.normalizer = tokenizers.normalizers.NFC()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated"),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


@dataclass(frozen=True)
class EagleTokenizer:
    """The Qwen3 tokenizer and chat template of an Eagle 2.5 checkpoint folder."""

    tokenizer: tokenizers.Tokenizer
    chat_template: str
    special_tokens: dict[str, str]  # bos_token, eos_token, pad_token, ... as the template sees them
    pad_id: int
    sha256: str

    @classmethod
    def from_dir(cls, path: Path) -> EagleTokenizer:
        path = Path(path)
        config = read_json(path / TOKENIZER_CONFIG_FILE) if (path / TOKENIZER_CONFIG_FILE).is_file() else {}
        tok = cls._load_model(path, config)
        special = {
            name: special_token_content(value)
            for source in (
                read_json(path / SPECIAL_TOKENS_FILE) if (path / SPECIAL_TOKENS_FILE).is_file() else {},
                config,
            )
            for name, value in source.items()
            if name.endswith("_token") and isinstance(special_token_content(value), str)
        }
        pad = special.get("pad_token")
        pad_id = None if pad is None else tok.token_to_id(pad)
        if pad_id is None:
            raise CheckpointError(
                f"{path / TOKENIZER_CONFIG_FILE} names no pad_token the tokenizer knows; "
                "copy the Eagle tokenizer files."
            )
        for token in (IMAGE_START, IMAGE_END, IMAGE_CONTEXT):
            if tok.token_to_id(token) is None:
                raise CheckpointError(f"The tokenizer in {path} has no {token} token; copy the Eagle tokenizer files.")
        if (path / CHAT_TEMPLATE_FILE).is_file():
            template = read_json(path / CHAT_TEMPLATE_FILE).get("chat_template")
        else:
            template = config.get("chat_template")
        if not isinstance(template, str):
            raise CheckpointError(
                f"{path} has no chat template ({CHAT_TEMPLATE_FILE} or chat_template in {TOKENIZER_CONFIG_FILE}); "
                "copy the Eagle processor files."
            )
        digest = hashlib.sha256()
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                digest.update(name.encode() + b"\0" + (path / name).read_bytes())
        eagle = cls(tok, template, special, pad_id, digest.hexdigest())
        # A template that cannot lay out an image-and-text turn (e.g. GR00T N1's text-only one)
        # would otherwise fail on the first observation instead of at load.
        try:
            eagle_prompt(eagle, "probe", cameras=1, tokens_per_image=1)
        except (jinja2.exceptions.TemplateError, TypeError) as e:
            raise CheckpointError(
                f"The chat template in {path} cannot render GR00T's image and text turn ({e}); "
                "use the Eagle 2.5 chat_template.json from Isaac-GR00T's eagle2_hg_model."
            ) from None
        return eagle

    @staticmethod
    def _load_model(path: Path, config: dict) -> tokenizers.Tokenizer:
        if (path / TOKENIZER_JSON).is_file():
            try:
                return tokenizers.Tokenizer.from_file(str(path / TOKENIZER_JSON))
            except Exception as e:  # tokenizers raises a bare Exception for unreadable files
                raise CheckpointError(
                    f"{path / TOKENIZER_JSON} is not a valid tokenizer ({e}); copy it again."
                ) from None
        missing = [name for name in (VOCAB_FILE, MERGES_FILE) if not (path / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{path} lacks the tokenizer file(s) {', '.join(missing)}; copy the Eagle 2.5 tokenizer "
                f"({VOCAB_FILE}, {MERGES_FILE}, {ADDED_TOKENS_FILE}, {TOKENIZER_CONFIG_FILE}) into the checkpoint."
            )
        try:
            bpe = tokenizers.models.BPE.from_file(str(path / VOCAB_FILE), str(path / MERGES_FILE))
        except Exception as e:  # as above
            raise CheckpointError(f"{path / VOCAB_FILE} / {MERGES_FILE} are not a valid BPE model ({e}).") from None
        tok = qwen_byte_level(tokenizers.Tokenizer(bpe))
        added = {
            int(i): (entry["content"], bool(entry.get("special", True)))
            for i, entry in config.get("added_tokens_decoder", {}).items()
        }
        if (path / ADDED_TOKENS_FILE).is_file():
            for content, i in read_json(path / ADDED_TOKENS_FILE).items():
                added.setdefault(int(i), (content, True))
        for i, (content, special) in sorted(added.items()):
            if tok.token_to_id(content) is None:
                tok.add_tokens([tokenizers.AddedToken(content, special=special, normalized=not special)])
            if tok.token_to_id(content) != i:
                raise CheckpointError(
                    f"Added token {content!r} should have id {i} but gets {tok.token_to_id(content)}; "
                    f"{path / ADDED_TOKENS_FILE} does not belong to {path / VOCAB_FILE}."
                )
        return tok

    @functools.cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def render(self, messages: list[dict]) -> str:
        """The chat template as HF's apply_chat_template renders it, with the generation prompt."""
        return self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def prompt_text(instruction: str, layout: str) -> str:
    """The instruction as the layout's training pipeline wrote it into the prompt."""
    return instruction if layout == "nvidia" else str([instruction])


def eagle_prompt(tokenizer: EagleTokenizer, text: str, cameras: int, tokens_per_image: int) -> str:
    content = [{"type": "image"} for _ in range(cameras)] + [{"type": "text", "text": text}]
    text = tokenizer.render([{"role": "user", "content": content}])
    image = IMAGE_START + IMAGE_CONTEXT * tokens_per_image + IMAGE_END
    return _MEDIA_PLACEHOLDER.sub(lambda m: f"<image {m.group(1)}>{image}", text)


def crop_and_resize(image: np.ndarray, size: int, truncate: bool = False, scale: float = CROP_SCALE) -> np.ndarray:
    """torchvision's CenterCrop to (⌊H·scale⌋, ⌊W·scale⌋), then an antialiased bilinear resize to
    size×size: in float and truncated to uint8 as Isaac-GR00T does (`truncate`), or on the 8-bit
    image, rounded."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise QuantVLAError(
            f"GR00T needs uint8 H×W×3 RGB images, got shape {image.shape} and dtype {image.dtype}; "
            "convert the image to 8-bit RGB first."
        )
    h, w = image.shape[:2]
    ch, cw = int(h * scale), int(w * scale)
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    crop = np.ascontiguousarray(image[top : top + ch, left : left + cw])
    if not truncate:
        return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))
    # VideoToTensor, VideoResize (torchvision's resize_image: F.interpolate antialiased, nothing when the
    # size already fits), VideoToNumpy.
    pixels = torch.from_numpy(crop).permute(2, 0, 1)[None].to(torch.float32) / 255.0
    if (ch, cw) != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (pixels[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()


class GR00TProcessor:
    def __init__(self, cfg: GR00TConfig, tokenizer: EagleTokenizer, layout: str) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.layout = layout  # "nvidia" | "lerobot": whose training pipeline the inputs follow

    @classmethod
    def from_checkpoint(cls, info: CheckpointInfo) -> GR00TProcessor:
        return cls(info.config, EagleTokenizer.from_dir(info.path), info.layout)

    def images(self, images: dict[str, np.ndarray]) -> tuple[np.ndarray, list[bool]]:
        missing = [name for name in self.cfg.camera_names if name not in images]
        if missing:
            raise QuantVLAError(
                f"GR00T needs every camera it was trained with; the observation lacks {missing} "
                f"(it takes {list(self.cfg.camera_names)})."
            )
        size = self.cfg.image_size
        truncate = self.layout == "nvidia"
        out = [
            image_to_model(crop_and_resize(images[name], size, truncate)).transpose(2, 0, 1)
            for name in self.cfg.camera_names
        ]
        return np.stack(out), [True] * len(out)

    def prompt(self, instruction: str, state_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded int64 tokens [max_token_len] and their mask; the state is not part of GR00T's prompt."""
        tokens, mask = self._tokens(instruction)
        return tokens.copy(), mask.copy()

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one processor per loaded policy; the instruction rarely changes
    def _tokens(self, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        # Rendering the chat template and tokenizing takes milliseconds; the node asks every inference.
        cfg = self.cfg
        text = prompt_text(instruction, self.layout)
        ids = self.tokenizer.encode(eagle_prompt(self.tokenizer, text, len(cfg.camera_names), cfg.tokens_per_image))
        if len(ids) > cfg.max_token_len:
            raise QuantVLAError(
                f"The prompt for instruction {instruction!r} takes {len(ids)} tokens but this policy's "
                f"max_token_len is {cfg.max_token_len}; shorten the instruction or raise max_token_len in config.json."
            )
        tokens = np.full(cfg.max_token_len, self.tokenizer.pad_id, dtype=np.int64)
        tokens[cfg.max_token_len - len(ids) :] = ids
        return tokens, np.arange(cfg.max_token_len) >= cfg.max_token_len - len(ids)

    def signature(self) -> dict:
        return {
            "image_size": self.cfg.image_size,
            "image_transform": f"center crop {CROP_SCALE}, bilinear resize, "
            f"{'truncated' if self.layout == 'nvidia' else 'rounded'} to uint8, [-1, 1]",
            "cameras": list(self.cfg.camera_names),
            "tokens_per_image": self.cfg.tokens_per_image,
            "max_token_len": self.cfg.max_token_len,
            "prompt": f"eagle2.5 chat template, {prompt_text('instruction', self.layout)}, left padded",
            "tokenizer_sha256": self.tokenizer.sha256,
        }
