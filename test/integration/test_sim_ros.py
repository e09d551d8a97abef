"""The simulator node over real DDS: its topics, and a closed loop with the policy node."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
import yaml
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from quantvla_ros.cli import main
from quantvla_ros.paths import config_file, demo_policy
from quantvla_ros.sim.ros_eval import evaluate_over_ros
from quantvla_ros.sim.tasks import INSTRUCTIONS, STATE_NAMES

pytestmark = pytest.mark.integration


def test_sim_node_publishes_the_robot_topics_and_reports_episodes(tmp_path):
    params = tmp_path / "sim.yaml"
    params.write_text(
        yaml.safe_dump(
            {"/**": {"ros__parameters": {"tasks": ["drawer-close"], "episodes": 1, "controller": "expert", "seed": 3}}}
        )
    )
    rclpy.init()
    node = rclpy.create_node("sim_listener")
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    seen: dict[str, list] = {"image": [], "joints": [], "clock": [], "instruction": [], "episode": []}
    node.create_subscription(Image, "/camera/image_raw", seen["image"].append, 10)
    node.create_subscription(JointState, "/joint_states", seen["joints"].append, 10)
    node.create_subscription(Clock, "/clock", seen["clock"].append, 100)
    node.create_subscription(String, "/instruction", seen["instruction"].append, latched)
    node.create_subscription(String, "/sim/episode", seen["episode"].append, latched)
    exe = Path(sys.executable).parent / "sim_node"
    proc = subprocess.Popen([str(exe), "--ros-args", "--params-file", str(params)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not seen["episode"] and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        node.destroy_node()
        rclpy.shutdown()
    assert proc.returncode == 0, out
    result = json.loads(seen["episode"][-1].data)
    assert result == {"task": "drawer-close", "seed": 3, "success": True, "steps": result["steps"]}
    assert seen["instruction"][-1].data == INSTRUCTIONS["drawer-close"]
    image = seen["image"][-1]
    assert (image.encoding, image.width, image.height, image.step) == ("rgb8", 112, 112, 336)
    assert list(seen["joints"][-1].name) == list(STATE_NAMES)
    clock = [c.clock.sec + c.clock.nanosec * 1e-9 for c in seen["clock"]]
    assert clock == sorted(clock) and clock[-1] > 0.5
    assert np.isclose(image.header.stamp.sec + image.header.stamp.nanosec * 1e-9, clock[-1], atol=0.2)


def test_the_ros_loop_completes_an_episode_with_the_shipped_policy():
    result = evaluate_over_ros(demo_policy(), config_file("sim_policy.yaml"), ["drawer-close"], episodes=1, seed=1000)
    task = result["tasks"]["drawer-close"]
    assert len(task["successes"]) == 1 and 0 < task["mean_length"] <= 200
    assert result["policy_latency_p50_ms"] is not None and result["policy_latency_p50_ms"] > 0


def test_a_policy_node_that_cannot_start_ends_the_evaluation_with_its_log(tmp_path, capsys):
    not_a_policy = tmp_path / "not_a_policy"
    not_a_policy.mkdir()
    code = main(["eval-sim", "--ros", "--policy", str(not_a_policy), "--tasks", "reach", "--episodes", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "The policy node exited with code" in err and "config.json" in err
