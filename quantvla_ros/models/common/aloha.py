"""LeRobot's `adapt_to_pi_aloha`: SmolVLA checkpoints, and π0 ones from LeRobot before 0.4, fine-tuned
on Aloha data in the joint and gripper space of the π internal runtime (LeRobot
`policies/smolvla/modeling_smolvla.py`, v0.3 `policies/pi0/modeling_pi0.py`: the same conversion).

The state is decoded before it reaches the model (joints 1, 2, 8, 9 flipped; the grippers 6, 13
from Aloha's linear position to the normalized angle) and the actions encoded after (the same
flips; the grippers from that angle to Aloha's joint range). Where the conversion sits depends
on the LeRobot version that trained the checkpoint: before 0.4 the policy normalized itself, so
it converted robot units; from 0.4 the processor pipeline normalizes first, so the policy
converts normalized values. `aloha_adapter` takes the place from the checkpoint's layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantvla_ros.models.common.checkpoint import CONFIG_FILE, CheckpointError, RobotAdapter

FLIPPED = [1, 2, 8, 9]
GRIPPERS = [6, 13]
DIMS = 14  # two 6-joint arms, each with a gripper
LEROBOT_PREPROCESSOR = "policy_preprocessor.json"
# Aloha's PUPPET_GRIPPER_POSITION_OPEN/CLOSED, the Interbotix arm and horn lengths, the angle
# range LeRobot measured on a Trossen robot, and PUPPET_GRIPPER_JOINT_OPEN/CLOSE.
POSITION = (0.01844, 0.05800)
ARM_LENGTH, HORN_RADIUS = 0.036, 0.022
ANGLE = (0.4, 1.5)
JOINT = (-0.6213, 1.4910)


def _normalize(x: np.ndarray, low_high: tuple[float, float]) -> np.ndarray:
    low, high = low_high
    return (x - low) / (high - low)


def _unnormalize(x: np.ndarray, low_high: tuple[float, float]) -> np.ndarray:
    low, high = low_high
    return x * (high - low) + low


def gripper_to_angular(value: np.ndarray) -> np.ndarray:
    """Aloha's linear gripper position -> SmolVLA's normalized gripper angle."""
    position = _unnormalize(value, POSITION)
    # The inverse of Interbotix's angle-to-linear transform; LeRobot clamps the arcsine's argument.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (HORN_RADIUS**2 + position**2 - ARM_LENGTH**2) / (2 * HORN_RADIUS * position)
    return _normalize(np.arcsin(np.clip(ratio, -1.0, 1.0)), ANGLE)


def gripper_from_angular(value: np.ndarray) -> np.ndarray:
    """SmolVLA's normalized gripper angle -> Aloha's normalized gripper joint."""
    return _normalize(_unnormalize(value, ANGLE), JOINT)


def decode_state(state: np.ndarray) -> np.ndarray:
    out = np.array(state, dtype=np.float64)
    out[..., FLIPPED] *= -1
    out[..., GRIPPERS] = gripper_to_angular(out[..., GRIPPERS])
    return out.astype(np.float32)


def encode_actions(actions: np.ndarray) -> np.ndarray:
    out = np.array(actions, dtype=np.float64)
    out[..., FLIPPED] *= -1
    out[..., GRIPPERS] = gripper_from_angular(out[..., GRIPPERS])
    return out.astype(np.float32)


def aloha_adapter(normalized: bool) -> RobotAdapter:
    return RobotAdapter("adapt_to_pi_aloha", decode_state, encode_actions, normalized)


def config_adapter(path: Path, raw: dict, state_dim: int | None, action_dim: int | None) -> RobotAdapter | None:
    """LeRobot's Aloha conversion when config.json asks for it, at the place the checkpoint's LeRobot
    version applied it; its unported relative-joint mode is refused, never ignored."""
    file = path / CONFIG_FILE
    if raw.get("use_delta_joint_actions_aloha", False):
        raise CheckpointError(
            f"{file} sets use_delta_joint_actions_aloha, which LeRobot itself never implemented; "
            "use a checkpoint trained without it."
        )
    if not raw.get("adapt_to_pi_aloha", False):
        return None
    if state_dim != DIMS or action_dim != DIMS:
        raise CheckpointError(
            f"{file} sets adapt_to_pi_aloha, which converts a {DIMS}-value Aloha state and action, but its "
            f"state has {state_dim} and its action {action_dim} values; fix input_features and output_features."
        )
    # A processor pipeline (LeRobot 0.4 on) normalizes before the policy converts.
    return aloha_adapter(normalized=(path / LEROBOT_PREPROCESSOR).is_file())
