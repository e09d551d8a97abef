"""Tiny SmolVLA checkpoints and inputs for tests, written through the same code as real ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from quantvla_ros.models.smolvla.checkpoint import save_smolvla
from quantvla_ros.models.smolvla.config import SmolVLAConfig, smolvla_tiny
from quantvla_ros.models.smolvla.model import SmolVLAModel

from conftest import INSTRUCTIONS, STATE_DIM, robot_stats

# SmolVLM2's special tokens at its ids: unk, bos and pad (tokenizer_config.json names them).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_TOKEN = "<|im_end|>"


def write_smolvlm_tokenizer(out_dir: Path, vocab_size: int = 320) -> Path:
    """A small byte-level BPE in SmolVLM2's tokenizer.json format (no post-processor, so no BOS),
    plus the tokenizer_config.json fields the processor reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([f"{text}\n" for text in INSTRUCTIONS], trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "pad_token": PAD_TOKEN,
        "unk_token": "<|endoftext|>",
        "truncation_side": "left",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir


def tiny_model(vocab_size: int, seed: int = 0) -> SmolVLAModel:
    torch.manual_seed(seed)
    return SmolVLAModel(smolvla_tiny(vocab_size)).eval()


def make_smolvla_checkpoint(root: Path, name: str = "smolvla", **save_kwargs) -> Path:
    tokenizer_dir = write_smolvlm_tokenizer(root / f"{name}_tokenizer")
    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    return save_smolvla(tiny_model(vocab_size), root / name, robot_stats(), tokenizer_dir, **save_kwargs)


def model_inputs(cfg: SmolVLAConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch with the last camera of sample 1 missing and prompts of 7 tokens."""
    g = torch.Generator().manual_seed(seed)
    size, cams = cfg.image_size, len(cfg.camera_names)
    token_masks = torch.ones(batch, cfg.max_token_len, dtype=torch.bool)
    token_masks[:, 7:] = False
    image_masks = torch.ones(batch, cams, dtype=torch.bool)
    image_masks[1, -1] = False
    return dict(
        images=torch.rand(batch, cams, 3, size, size, generator=g) * 2 - 1,
        image_masks=image_masks,
        tokens=torch.randint(0, cfg.vlm.vocab_size, (batch, cfg.max_token_len), generator=g),
        token_masks=token_masks,
        state=torch.randn(batch, cfg.max_state_dim, generator=g),
        noise=torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=g),
    )


def robot_images(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "camera1": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
        "camera2": rng.integers(0, 256, (20, 32, 3), dtype=np.uint8),
    }


def robot_state(seed: int = 0) -> np.ndarray:
    stats = robot_stats()["state"]
    rng = np.random.default_rng(seed)
    return (stats.mean + rng.uniform(-1, 1, STATE_DIM) * stats.std).astype(np.float32)
