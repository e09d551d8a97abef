"""`make demo`: the π0.5 runtime end to end on this machine.

Until the simulator issue ships a trained demo policy, the demo shows what the runtime does
with a real checkpoint folder: the full-size π0.5 planned on the meta device (parameters and
weight memory per component), then a small π0.5 written in the openpi layout with its own
tokenizer and robot statistics, loaded back through `load_policy`, and run on a camera frame,
instruction and joint state, printing the action chunk in robot units and the latency.
The small policy's weights are freshly initialised, so its actions carry no skill yet.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from quantvla_ros.models.config import GemmaConfig, PI0Config, SiglipConfig, pi05_full
from quantvla_ros.models.init_checkpoint import init_checkpoint
from quantvla_ros.models.pi0 import PI0Model
from quantvla_ros.models.policy import Observation, load_policy
from quantvla_ros.models.processing import NormStats

DEMO_CONFIG = PI0Config(
    pi05=True,
    llm=GemmaConfig(width=128, depth=4, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=32),
    expert=GemmaConfig(width=64, depth=4, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=32),
    vision=SiglipConfig(image_size=224, patch_size=14, width=96, depth=4, num_heads=4, mlp_dim=384),
    action_dim=32,
    action_horizon=10,
    max_token_len=64,
    num_steps=10,
    camera_names=("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"),
)
INSTRUCTIONS = ["pick up the red block", "open the drawer", "press the button", "push the puck to the goal"]
JOINTS = 7


def demo_stats() -> dict[str, NormStats]:
    """A 7-joint arm in radians with a gripper, the units a JointState carries."""
    low = np.array([-2.9, -1.8, -2.9, -3.0, -2.9, -0.1, -2.9], np.float32)
    high = np.array([2.9, 1.8, 2.9, 0.0, 2.9, 3.7, 2.9], np.float32)
    stats = NormStats(mean=(low + high) / 2, std=(high - low) / 4, q01=low, q99=high)
    return {"state": stats, "actions": stats}


def demo_frame(size: int = 240) -> np.ndarray:
    """A 4:3 camera frame of a table with a red block, so resize-with-pad has work to do."""
    frame = np.full((size, size * 4 // 3, 3), (90, 70, 50), np.uint8)
    frame[: size // 3] = (180, 200, 220)
    frame[size // 2 : size // 2 + 30, size // 2 : size // 2 + 30] = (200, 30, 30)
    return frame


def print_full_size_plan() -> None:
    with torch.device("meta"):
        model = PI0Model(pi05_full())
    counts = model.component_parameters()
    print("Full-size π0.5 (gemma_2b + gemma_300m + So400m/14 @ 224), built on the meta device:")
    for name, n in counts.items():
        print(f"  {name:<20} {n / 1e6:9.1f} M params  {2 * n / 2**30:6.2f} GiB in bf16")
    total = sum(counts.values())
    print(f"  {'total':<20} {total / 1e6:9.1f} M params  {2 * total / 2**30:6.2f} GiB in bf16\n")


def run_demo(out_dir: Path = Path("build/demo"), device: str = "cpu") -> None:
    print_full_size_plan()
    path = out_dir / "pi05_small"
    if not (path / "config.json").exists():
        print(f"Writing a small π0.5 checkpoint (openpi layout) to {path} ...")
        init_checkpoint(path, DEMO_CONFIG, INSTRUCTIONS, norm_stats=demo_stats(), vocab_size=400)
    policy = load_policy(path, device=device)
    counts = policy.model.component_parameters()
    print(f"Loaded {path}: π0.5, {sum(counts.values()) / 1e6:.1f} M params, cameras {list(policy.camera_names)}")
    obs = Observation(
        images={"base_0_rgb": demo_frame(), "left_wrist_0_rgb": demo_frame(120)},
        instruction=INSTRUCTIONS[0],
        state=np.array([0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8], np.float32),
    )
    noise = np.random.default_rng(0).standard_normal((policy.horizon, DEMO_CONFIG.action_dim)).astype(np.float32)
    policy.predict(obs, noise)  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        chunk = policy.predict(obs, noise)
        times.append(time.perf_counter() - start)
    print(
        f'Instruction "{obs.instruction}", right wrist camera missing (masked), state {np.round(obs.state, 3).tolist()}'
    )
    print(f"Action chunk [{chunk.actions.shape[0]} steps x {chunk.actions.shape[1]} joints], radians:")
    for k, row in enumerate(chunk.actions):
        print(f"  step {k:2d}: " + " ".join(f"{v:+.3f}" for v in row))
    print(
        f"Latency on {device}: median {1e3 * float(np.median(times)):.1f} ms over {len(times)} runs "
        f"({policy.model.cfg.num_steps} denoising steps, prefix cached)."
    )
    print("These weights are freshly initialised; the trained demo policy comes with the simulator.")
