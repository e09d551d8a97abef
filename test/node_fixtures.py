"""The policy node as launch starts it (entry point + params file), and a peer that plays the robot.

Shared by the policy-node, lifecycle and fuzz tests (their fixtures `ros`, `peer`, `policy_path` and
`slow_policy_path` are in conftest.py); everything talks over real DDS on loopback, in the test
run's own domain.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from PIL import Image as PILImage
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from conftest import ACTION_DIM, STATE_DIM

STATE_JOINTS = [f"joint{i}" for i in range(STATE_DIM)]
ACTION_JOINTS = [f"act{i}" for i in range(ACTION_DIM)]
DT = 0.05
STATUS_NAME = "quantvla_ros: policy_node"
# Denoising steps that make one inference of the tiny π0.5 take about a second on a 2-core CPU.
SLOW_STEPS = 2000


def start_node(params: dict, tmp_path: Path, name: str = "policy") -> subprocess.Popen:
    """Entry point + params file, exactly what `ros2 launch` runs."""
    file = tmp_path / f"{name}.yaml"
    file.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    exe = Path(sys.executable).parent / "policy_node"
    return subprocess.Popen(
        [str(exe), "--ros-args", "--params-file", str(file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ},
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def memory_kib(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in KiB: VmRSS (resident now) or VmHWM (the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def params(policy_path: Path, **overrides) -> dict:
    base = {
        "policy_path": str(policy_path),
        "device": "cpu",
        "camera_names": ["base_0_rgb", "left_wrist_0_rgb"],
        "camera_topics": ["/test/base/image_raw", "/test/wrist/image_raw/compressed"],
        "camera_types": ["raw", "compressed"],
        "instruction_topic": "/test/instruction",
        "joint_states_topic": "/test/joint_states",
        "state_joints": STATE_JOINTS,
        "action_joints": ACTION_JOINTS,
        "action_topic": "/test/action_chunk",
        "action_dt": DT,
        "inference_rate": 10.0,
        "max_input_age": 0.6,
        "seed": 0,
    }
    base.update(overrides)
    return base


def stamp_now(msg) -> None:
    now = time.time()
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(now), int((now % 1) * 1e9)


def raw_image(width: int = 40, height: int = 30, pad: int = 8, encoding: str = "rgb8", stamp: float = 0.0) -> Image:
    rng = np.random.default_rng(0)
    channels = {"rgb8": 3, "bgr8": 3, "mono8": 1, "rgba8": 4}.get(encoding, 2)
    step = width * channels + pad
    data = rng.integers(0, 256, (height, step), dtype=np.uint8)
    msg = Image(height=height, width=width, encoding=encoding, step=step, data=data.tobytes())
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp), int((stamp % 1) * 1e9)
    return msg


def jpeg(width: int = 32, height: int = 24) -> CompressedImage:
    buf = io.BytesIO()
    PILImage.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buf, format="JPEG")
    return CompressedImage(format="jpeg", data=buf.getvalue())


def jpeg_claiming(width: int, height: int, real: int = 8) -> bytes:
    """A valid small JPEG whose frame header (SOF0) claims width x height."""
    buf = io.BytesIO()
    PILImage.fromarray(np.full((real, real, 3), 90, np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def joints(values=None, names=None) -> JointState:
    values = np.linspace(-1, 1, STATE_DIM) if values is None else values
    return JointState(name=names or list(reversed(STATE_JOINTS)), position=[float(v) for v in reversed(values)])


class Peer:
    """The robot side: publishes inputs, collects trajectories (with their DDS timestamps) and diagnostics."""

    def __init__(self) -> None:
        self.node = rclpy.create_node(f"peer_{os.getpid()}_{time.monotonic_ns()}")
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self.base = self.node.create_publisher(Image, "/test/base/image_raw", qos_profile_sensor_data)
        self.wrist = self.node.create_publisher(
            CompressedImage, "/test/wrist/image_raw/compressed", qos_profile_sensor_data
        )
        self.instruction = self.node.create_publisher(String, "/test/instruction", latched)
        self.joints = self.node.create_publisher(JointState, "/test/joint_states", qos_profile_sensor_data)
        self.trajectories: list[JointTrajectory] = []
        # Per trajectory: when the node published it and when it arrived here (ns, system clock).
        self.timestamps: list[tuple[int, int]] = []
        self.diagnostics: list[DiagnosticArray] = []
        self.node.create_subscription(JointTrajectory, "/test/action_chunk", self._on_trajectory, 50)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)

    def _on_trajectory(self, msg: JointTrajectory, info) -> None:
        self.trajectories.append(msg)
        self.timestamps.append((info["source_timestamp"], info["received_timestamp"]))

    def spin(self, seconds: float, publish=None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if publish is not None:
                publish()
            rclpy.spin_once(self.node, timeout_sec=0.05)

    def wait_for(self, condition, seconds: float, publish=None) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if condition():
                return True
            self.spin(0.1, publish)
        return condition()

    def good_inputs(self, stamp: float | None = 0.0):
        """Publish one round of valid inputs; stamp=None stamps the first camera with the time now."""

        def publish() -> None:
            image = raw_image(stamp=stamp or 0.0)
            if stamp is None:
                stamp_now(image)
            self.base.publish(image)
            self.wrist.publish(jpeg())
            self.joints.publish(joints())

        return publish

    def last_status(self):
        statuses = [s for d in self.diagnostics for s in d.status if s.name == STATUS_NAME]
        return statuses[-1] if statuses else None

    def last_values(self) -> dict[str, str]:
        status = self.last_status()
        return {} if status is None else {kv.key: kv.value for kv in status.values}

    def _call(self, client, request, seconds: float):
        if not client.wait_for_service(timeout_sec=seconds):
            raise TimeoutError(f"{client.srv_name} did not appear")
        future = client.call_async(request)
        rclpy.spin_until_future_complete(self.node, future, timeout_sec=seconds)
        if not future.done():
            raise TimeoutError(f"{client.srv_name} did not answer")
        return future.result()

    def change_state(self, transition: int, seconds: float = 120.0) -> bool:
        """Request a lifecycle transition of the policy node; True once it succeeded."""
        client = self.node.create_client(ChangeState, "/policy_node/change_state")
        try:
            return self._call(client, ChangeState.Request(transition=Transition(id=transition)), seconds).success
        finally:
            self.node.destroy_client(client)

    def state(self, seconds: float = 30.0) -> str:
        client = self.node.create_client(GetState, "/policy_node/get_state")
        try:
            return self._call(client, GetState.Request(), seconds).current_state.label
        finally:
            self.node.destroy_client(client)
