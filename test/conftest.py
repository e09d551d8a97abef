"""Shared fixtures: small checkpoints written through the same code as real ones."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.init_checkpoint import init_checkpoint
from quantvla_ros.models.pi0.config import tiny
from quantvla_ros.models.policy import Observation, load_float_policy

# DDS traffic stays on this machine, in a domain of this test run's own: two runs on one machine
# (a developer's and CI's) must not hear each other's latched instructions or /clock.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)

INSTRUCTIONS = [
    "pick up the red cup",
    "open the top drawer",
    "push the green button",
    "close the window",
    "put the block in the bowl",
    "reach the target",
]
STATE_DIM, ACTION_DIM = 6, 4


def robot_stats() -> dict[str, NormStats]:
    """Statistics of a made-up robot whose units are far from [-1, 1]."""
    rng = np.random.default_rng(7)

    def stats(dim: int) -> NormStats:
        mean = rng.uniform(-50, 50, dim).astype(np.float32)
        std = rng.uniform(1, 20, dim).astype(np.float32)
        return NormStats(mean=mean, std=std, q01=mean - 2 * std, q99=mean + 2 * std)

    return {"state": stats(STATE_DIM), "actions": stats(ACTION_DIM)}


def observation(seed: int = 0, **changes) -> Observation:
    rng = np.random.default_rng(seed)
    stats = robot_stats()["state"]
    fields = dict(
        images={
            "base_0_rgb": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
            "left_wrist_0_rgb": rng.integers(0, 256, (28, 28, 3), dtype=np.uint8),
        },
        instruction="pick up the red cup",
        state=(stats.mean + rng.uniform(-1, 1, STATE_DIM) * stats.std).astype(np.float32),
    )
    fields.update(changes)
    return Observation(**fields)


def make_checkpoint(root: Path, pi05: bool, layout: str, **kwargs) -> Path:
    name = f"{'pi05' if pi05 else 'pi0'}_{layout}"
    return init_checkpoint(root / name, tiny(pi05), INSTRUCTIONS, layout=layout, norm_stats=robot_stats(), **kwargs)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[tuple[bool, str], Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        (pi05, layout): make_checkpoint(root, pi05, layout)
        for pi05 in (False, True)
        for layout in ("openpi", "lerobot")
    }


def to_legacy_lerobot(folder: Path, out: Path) -> Path:
    """The same LeRobot checkpoint as a release before the processor pipelines wrote it: statistics
    as normalizer buffers among the weights, no processor JSON or normalizer files."""
    shutil.copytree(folder, out)
    stats = load_float_policy(folder).info.norm_stats
    weights = load_file(out / "model.safetensors")
    for prefix, feature, key in [
        ("normalize_inputs", "observation_state", "state"),
        ("normalize_targets", "action", "actions"),
        ("unnormalize_outputs", "action", "actions"),
    ]:
        for name in ("mean", "std"):
            weights[f"{prefix}.buffer_{feature}.{name}"] = torch.from_numpy(getattr(stats[key], name).copy())
    save_file(weights, out / "model.safetensors")
    for f in [*out.glob("policy_*processor*.json"), *out.glob("*normalizer_processor.safetensors")]:
        f.unlink()
    return out


# The policy-node tests' fixtures; their helpers (node_fixtures.py) import this module, hence the
# imports inside the fixtures.
@pytest.fixture(scope="module")
def ros():
    import rclpy

    rclpy.init()
    yield
    rclpy.shutdown()


@pytest.fixture
def peer(ros):
    from node_fixtures import Peer

    p = Peer()
    yield p
    p.node.destroy_node()


@pytest.fixture(scope="module")
def policy_path(checkpoints) -> Path:
    return checkpoints[(True, "openpi")]


@pytest.fixture(scope="module")
def slow_policy_path(tmp_path_factory) -> Path:
    """The tiny π0.5 with so many denoising steps that an inference is in flight for about a second."""
    from node_fixtures import SLOW_STEPS

    cfg = dataclasses.replace(tiny(True), num_steps=SLOW_STEPS)
    return init_checkpoint(tmp_path_factory.mktemp("slow") / "pi05_slow", cfg, INSTRUCTIONS, norm_stats=robot_stats())
