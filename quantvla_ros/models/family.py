"""What every policy family (π0 / π0.5, GR00T N1.5, SmolVLA) provides.

Quantization, calibration, the `Policy` API, the inference engine, the ROS nodes and the CLI
talk to a model only through these interfaces, so none of them special-cases a family:

    StagedModel      (models/stages.py) the nn.Module: its stages and the flow-matching sampler
                     over them, its Linear groups by module name (what a quantization layout
                     selects from) and its action-expert attention sites (where ATM's α and
                     OHB's β fold, observed through `attention_observer`)
    InputProcessor   robot observation -> model tensors (image geometry, prompt, tokenizer)
    ModelFamily      ties a model class to its checkpoint reader/writer and processor

`quantvla_ros.models.registry` holds the families and picks one from a checkpoint's config.json.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from quantvla_ros.models.stages import StagedModel

if TYPE_CHECKING:
    from quantvla_ros.models.common.checkpoint import CheckpointInfo


def attention_linears(layers: str) -> str:
    """The q/k/v/o projections of every layer under `layers` (HF decoder naming), as a LINEAR_GROUPS regex."""
    return rf"{re.escape(layers)}\.\d+\.self_attn\.[qkvo]_proj"


def mlp_linears(layers: str) -> str:
    """The gate/up/down projections of every layer under `layers`."""
    return rf"{re.escape(layers)}\.\d+\.mlp\.(gate|up|down)_proj"


def decoder_fusions(layers: str, depth: int, attention: bool = True) -> list[tuple[str, ...]]:
    """Per layer of a decoder stack, q/k/v (unless attention=False) and gate/up: the Linears that
    read one input and that the layer projects together (models/common/projection.py)."""
    groups = []
    for i in range(depth):
        if attention:
            groups.append(tuple(f"{layers}.{i}.self_attn.{p}_proj" for p in "qkv"))
        groups.append((f"{layers}.{i}.mlp.gate_proj", f"{layers}.{i}.mlp.up_proj"))
    return groups


def decoder_linears(layers: str) -> str:
    """Every Linear of a Gemma / Llama / Qwen decoder stack: the "llm" group of each family."""
    return f"{attention_linears(layers)}|{mlp_linears(layers)}"


@dataclass(frozen=True)
class AttentionSite:
    """One action-expert attention: α scales `q_proj`'s output rows head by head, β scales `o_proj`."""

    q_proj: str  # module name of the query projection
    o_proj: str  # module name of the output projection
    num_heads: int
    head_dim: int


class InputProcessor(Protocol):
    """One family's input geometry and prompt; the Policy does normalization and checks."""

    def images(self, images: dict[str, np.ndarray]) -> tuple[np.ndarray, list[bool]]:
        """uint8 H×W×3 per camera name -> float32 [cameras, 3, S, S] and a present-mask, in
        the model's camera order (missing cameras filled as the family's training did)."""
        ...

    def prompt(self, instruction: str, state_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 tokens [max_token_len] and their bool mask, for one instruction and normalized state."""
        ...

    def signature(self) -> dict:
        """Everything the two methods above depend on (tokenizer hash, sizes, prompt style)."""
        ...


@dataclass(frozen=True)
class ModelFamily:
    name: str  # e.g. "pi0" (π0 and π0.5), "groot_n1_5", "smolvla"
    # Does this config.json (parsed) in this folder describe one of ours?
    claims: Callable[[dict, Path], bool]
    # Folder + parsed config.json (+ optional asset/embodiment id) -> everything but the weights.
    read_checkpoint: Callable[[Path, dict, str | None], CheckpointInfo]
    build_model: Callable[[Any], StagedModel]
    # File tensors -> the model's keys; also returns keys dropped on purpose (unused heads).
    canonical_state_dict: Callable[[dict[str, torch.Tensor], str], tuple[dict[str, torch.Tensor], list[str]]]
    # The model's tensors under the file keys of a layout (inverse of canonical_state_dict).
    export_state_dict: Callable[[nn.Module, str], dict[str, torch.Tensor]]
    make_processor: Callable[[CheckpointInfo], InputProcessor]
    # Files of a checkpoint folder besides the weights (configs, tokenizer, statistics):
    # what an artifact copies. Glob patterns relative to the folder.
    side_files: tuple[str, ...]
