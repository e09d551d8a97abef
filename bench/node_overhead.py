"""Policy-node overhead: last input message -> published trajectory, minus the model's own time.

    python bench/node_overhead.py [--runs 30]

Starts the policy node as launch does (entry point + params file) with the small π0.5 and
three 224×224 rgb8 cameras, on the CPU. Each round publishes a joint state and the three
frames (the first camera, which paces inference, last) and waits for the trajectory; the
node's timer runs at 1 kHz so its period adds at most 1 ms. The node measures, per inference,
the time from the newest input's arrival to the publish minus `Policy.predict`
(`node_overhead_p50_ms` on /diagnostics), in the same process and run as the model time, so
other load on the machine does not leak into the difference.
The round trip seen from the publishing process is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from quantvla_ros.models.init_checkpoint import init_checkpoint, unit_norm_stats
from quantvla_ros.models.pi0.config import small_pi05

CONFIG = small_pi05()
CAMERAS = list(CONFIG.camera_names)
JOINT_NAMES = [f"joint{i + 1}" for i in range(7)]
INSTRUCTIONS = ["pick up the red block", "open the drawer", "press the button"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", "71")
    with tempfile.TemporaryDirectory(prefix="node_overhead_") as work:
        measure(Path(work), args.runs)


def measure(work: Path, runs: int) -> None:
    """Start the policy node on a small π0.5 written to `work` and time `runs` rounds through it."""
    stats = {"state": unit_norm_stats(len(JOINT_NAMES)), "actions": unit_norm_stats(len(JOINT_NAMES))}
    policy_path = init_checkpoint(work / "policy", CONFIG, INSTRUCTIONS, norm_stats=stats, vocab_size=400)
    params = {
        "policy_path": str(policy_path),
        "device": "cpu",
        "camera_names": CAMERAS,
        "camera_topics": [f"/bench/{c}" for c in CAMERAS],
        "camera_types": ["raw"] * 3,
        "instruction_topic": "/bench/instruction",
        "joint_states_topic": "/bench/joint_states",
        "state_joints": JOINT_NAMES,
        "action_joints": list(JOINT_NAMES),  # a shared list would become a YAML alias, which rcl rejects
        "action_topic": "/bench/action_chunk",
        "inference_rate": 1000.0,
        "max_input_age": 5.0,
        "seed": 0,
    }
    (work / "params.yaml").write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    node_exe = Path(sys.executable).parent / "policy_node"
    proc = subprocess.Popen([str(node_exe), "--ros-args", "--params-file", str(work / "params.yaml")])
    rclpy.init()
    peer = rclpy.create_node("bench_peer")
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    cams = [peer.create_publisher(Image, f"/bench/{c}", qos_profile_sensor_data) for c in CAMERAS]
    joints = peer.create_publisher(JointState, "/bench/joint_states", qos_profile_sensor_data)
    peer.create_publisher(String, "/bench/instruction", latched).publish(String(data=INSTRUCTIONS[0]))
    received: list[float] = []
    peer.create_subscription(
        JointTrajectory, "/bench/action_chunk", lambda _m: received.append(time.perf_counter()), 10
    )
    diagnostics: dict[str, str] = {}

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == "quantvla_ros: policy_node":
                diagnostics.update({kv.key: kv.value for kv in status.values})

    peer.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    frame = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    image = Image(height=224, width=224, encoding="rgb8", step=224 * 3, data=frame.tobytes())
    state = [0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8]
    try:
        round_trips = []
        deadline = time.monotonic() + 300
        while len(round_trips) < runs and time.monotonic() < deadline:
            count = len(received)
            # The first camera paces inference, so it goes last: the round starts complete.
            joints.publish(JointState(name=JOINT_NAMES, position=state))
            for pub in reversed(cams):
                pub.publish(image)
            sent = time.perf_counter()
            wait_until = time.monotonic() + 10
            while len(received) == count and time.monotonic() < wait_until:
                rclpy.spin_once(peer, timeout_sec=0.0005)
            if len(received) > count:
                round_trips.append(received[-1] - sent)
        settle = time.monotonic() + 2.5  # one more diagnostics message after the last round
        while time.monotonic() < settle:
            rclpy.spin_once(peer, timeout_sec=0.05)
        if len(round_trips) < runs or "node_overhead_p50_ms" not in diagnostics:
            raise SystemExit("The policy node did not answer; run `make test` to check the node first.")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        peer.destroy_node()
        rclpy.shutdown()
    print(f"3 cameras 224x224 rgb8, small π0.5 on CPU, {len(round_trips)} rounds")
    print(f"  round trip seen by the publisher  median {1e3 * statistics.median(round_trips):8.2f} ms")
    print(f"  Policy.predict in the node        p50    {diagnostics['latency_p50_ms']:>8} ms")
    print(
        f"  node overhead (input -> publish, minus predict) p50 {diagnostics['node_overhead_p50_ms']} ms "
        "(target <= 2 ms)"
    )


if __name__ == "__main__":
    main()
