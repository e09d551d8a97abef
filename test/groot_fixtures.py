"""Tiny GR00T N1.5 models, tokenizers and checkpoints, written in the real file formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tokenizers
import torch

from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.groot.config import GR00TConfig, groot_tiny
from quantvla_ros.models.groot.family import save_groot
from quantvla_ros.models.groot.model import GR00TN15Model
from quantvla_ros.models.groot.processor import qwen_byte_level
from quantvla_ros.models.policy import Observation

TAG = "so100"  # embodiment row 2, inside the tiny model's 4 rows
SENTENCES = [
    "pick up the red cup",
    "open the top drawer",
    "put the block in the bowl",
    "You are a helpful assistant.",
    "system user assistant ['move'] 0123456789",
]
# After the trained vocabulary, in this order, as Qwen's added_tokens.json lists them.
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
# Eagle 2.5's template shape: a default system turn, then each image as <image-k> and the text.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{% set image_count.value = image_count.value + 1 %}<image-{{ image_count.value }}>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# state.arm (4) + state.gripper (1); action.arm (3) + action.gripper (1).
STATE_KEYS, ACTION_KEYS = {"arm": 4, "gripper": 1}, {"arm": 3, "gripper": 1}
STATE_DIM, ACTION_DIM = sum(STATE_KEYS.values()), sum(ACTION_KEYS.values())


def write_tokenizer(out: Path) -> Path:
    """A byte-level BPE trained on a few sentences, saved as Qwen's vocab.json + merges.txt + added tokens."""
    out.mkdir(parents=True, exist_ok=True)
    tok = qwen_byte_level(tokenizers.Tokenizer(tokenizers.models.BPE()))
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.model.save(str(out))
    base = tok.get_vocab_size()
    added = {token: base + i for i, token in enumerate(ADDED_TOKENS)}
    (out / "added_tokens.json").write_text(json.dumps(added))
    decoder = {str(i): {"content": t, "special": True, "normalized": False} for t, i in added.items()}
    config = {"added_tokens_decoder": decoder, "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return out


def image_token_id(tokenizer_dir: Path) -> int:
    return json.loads((tokenizer_dir / "added_tokens.json").read_text())["<IMG_CONTEXT>"]


def tiny_config(tokenizer_dir: Path) -> GR00TConfig:
    return groot_tiny(vocab_size=320, image_token_id=image_token_id(tokenizer_dir))


def tiny_model(cfg: GR00TConfig, seed: int = 0) -> GR00TN15Model:
    """Random weights large enough that every module moves the output."""
    model = GR00TN15Model(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


def norm_stats(seed: int = 3) -> dict[str, NormStats]:
    rng = np.random.default_rng(seed)

    def stats(dim: int) -> NormStats:
        low = rng.uniform(-40, 0, dim)
        high = low + rng.uniform(1, 30, dim)
        mid, spread = (low + high) / 2, (high - low) / 4
        return NormStats(min=low, max=high, mean=mid, std=spread, q01=low + 0.1, q99=high - 0.1)

    out = {f"state.{k}": stats(d) for k, d in STATE_KEYS.items()}
    out.update({f"action.{k}": stats(d) for k, d in ACTION_KEYS.items()})
    return out


def write_checkpoint(root: Path, layout: str, seed: int = 0, **kwargs) -> Path:
    tokenizer_dir = write_tokenizer(root / "tokenizer")
    model = tiny_model(tiny_config(tokenizer_dir), seed)
    return save_groot(
        model,
        root / f"groot_{layout}",
        layout=layout,
        norm_stats=norm_stats(),
        tokenizer_dir=tokenizer_dir,
        embodiment_tag=TAG,
        **kwargs,
    )


def observation(cfg: GR00TConfig, seed: int = 0, **changes) -> Observation:
    rng = np.random.default_rng(seed)
    fields = dict(
        images={
            name: rng.integers(0, 256, (40 + 8 * i, 52, 3), dtype=np.uint8) for i, name in enumerate(cfg.camera_names)
        },
        instruction="pick up the red cup",
        state=rng.uniform(-30, 10, STATE_DIM).astype(np.float32),
    )
    fields.update(changes)
    return Observation(**fields)
