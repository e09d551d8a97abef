"""The topic/joint mapping one YAML gives both the policy node and the calibration node.

Calibration and deployment must preprocess identically, so both read the same parameters:
which topic feeds which policy camera (and whether it is raw or compressed), the instruction
and joint-state topics, the joint order that forms the state vector, and the action joints.
The file is a ROS 2 parameters file; the section under `/**` (or the node's name) is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from quantvla_ros.errors import QuantVLAError

IMAGE_TYPES = ("raw", "compressed")


@dataclass(frozen=True)
class TopicMapping:
    camera_names: tuple[str, ...]
    camera_topics: tuple[str, ...]
    camera_types: tuple[str, ...]
    instruction_topic: str
    joint_states_topic: str
    state_joints: tuple[str, ...]
    action_joints: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.camera_names)
        if n == 0:
            raise QuantVLAError("camera_names is empty; map at least one camera topic to a policy camera.")
        if len(self.camera_topics) != n or len(self.camera_types) != n:
            raise QuantVLAError(
                f"camera_names ({n}), camera_topics ({len(self.camera_topics)}) and camera_types "
                f"({len(self.camera_types)}) must list the same cameras in the same order."
            )
        bad = [t for t in self.camera_types if t not in IMAGE_TYPES]
        if bad:
            raise QuantVLAError(f"camera_types {bad} are not allowed; use 'raw' or 'compressed' per camera.")
        if not self.state_joints:
            raise QuantVLAError("state_joints is empty; list the joints that form the policy's state, in order.")

    def check_policy(self, policy) -> None:
        """Refuse, in one sentence, a mapping that does not fit `policy` (a `Policy`), before any input is read."""
        unknown = [c for c in self.camera_names if c not in policy.camera_names]
        if unknown:
            raise QuantVLAError(
                f"camera_names {unknown} are not cameras of this policy; use {list(policy.camera_names)}."
            )
        if policy.state_dim is not None and len(self.state_joints) != policy.state_dim:
            raise QuantVLAError(
                f"state_joints lists {len(self.state_joints)} joints but the policy's state has {policy.state_dim}."
            )
        # Calibration reads no actions, so a mapping made for it alone may leave them out.
        if self.action_joints and len(self.action_joints) != policy.action_dim:
            raise QuantVLAError(
                f"action_joints lists {len(self.action_joints)} joints but the policy outputs {policy.action_dim}."
            )

    @classmethod
    def from_params(cls, params: dict) -> TopicMapping:
        def strings(key: str) -> tuple[str, ...]:
            value = params.get(key, [])
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise QuantVLAError(f"Parameter {key} must be a list of strings, got {value!r}.")
            return tuple(value)

        return cls(
            camera_names=strings("camera_names"),
            camera_topics=strings("camera_topics"),
            camera_types=strings("camera_types") or ("raw",) * len(strings("camera_names")),
            instruction_topic=str(params.get("instruction_topic", "/instruction")),
            joint_states_topic=str(params.get("joint_states_topic", "/joint_states")),
            state_joints=strings("state_joints"),
            action_joints=strings("action_joints"),
        )


def read_params_file(path: Path | str, node_name: str) -> dict:
    """The `ros__parameters` of `node_name` (or of `/**`) in a ROS 2 parameters YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise QuantVLAError(f"Parameters file {path} does not exist.") from None
    except yaml.YAMLError as e:
        raise QuantVLAError(f"Parameters file {path} is not valid YAML ({e}).") from None
    params: dict = {}
    for key in ("/**", node_name, f"/{node_name}"):
        section = (data or {}).get(key, {})
        if isinstance(section, dict):
            params.update(section.get("ros__parameters", {}) or {})
    if not params:
        raise QuantVLAError(f"Parameters file {path} has no ros__parameters under '/**' or '{node_name}'.")
    return params
