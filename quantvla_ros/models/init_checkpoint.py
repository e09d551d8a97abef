"""A fresh, randomly initialised checkpoint folder in the openpi or LeRobot layout.

The starting point for policies this project trains itself (its tokenizer is trained on
their instructions, since PaliGemma's cannot be downloaded here), and the source of the
small checkpoints the tests and the demo load through the same code as real ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.common.tokenizer import PromptTokenizer, train_tokenizer
from quantvla_ros.models.pi0.checkpoint import save_pi0
from quantvla_ros.models.pi0.config import PI0Config
from quantvla_ros.models.pi0.model import PI0Model


def unit_norm_stats(dim: int) -> NormStats:
    """Statistics that leave values in [-1, 1] unchanged under both normalization modes."""
    zeros, ones = np.zeros(dim, np.float32), np.ones(dim, np.float32)
    return NormStats(mean=zeros, std=ones, q01=-ones, q99=ones)


def init_checkpoint(
    out_dir: Path | str,
    cfg: PI0Config,
    instructions: list[str],
    layout: str = "openpi",
    norm_stats: dict[str, NormStats] | None = None,
    vocab_size: int = 300,
    seed: int = 0,
    max_shard_bytes: int | None = None,
) -> Path:
    """Train a tokenizer on `instructions`, initialise `cfg` with its vocabulary, save both."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(Path(tmp), instructions, vocab_size)
        tokenizer = PromptTokenizer.from_dir(Path(tmp))
        cfg = cfg.with_changes(vocab_size=tokenizer.vocab_size)
        torch.manual_seed(seed)
        model = PI0Model(cfg).eval()
        return save_pi0(model, out_dir, layout, norm_stats, Path(tmp), max_shard_bytes=max_shard_bytes)
