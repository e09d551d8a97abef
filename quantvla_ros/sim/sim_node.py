"""The simulator node: a MetaWorld task behind the same topics a real robot has.

Publishes the camera (`sensor_msgs/Image`, rgb8), the state (`sensor_msgs/JointState` named
by `SimEnv.state_names`), the task instruction (`std_msgs/String`, latched) and `/clock`;
executes the first `execute_steps` actions of each `JointTrajectory` it receives; resets
episodes and reports each one (`/sim/episode` as JSON in a `std_msgs/String`, and the log).

Sim time only advances when the simulator steps, so a slow policy never makes the robot
"move" while it thinks: after each observation the node waits for the chunk answering it
(its `header.stamp` equals the observation's) and republishes the observation if none comes
within `action_timeout` seconds of wall time. With `controller: expert` it runs MetaWorld's
scripted expert instead and needs no policy. Seeds are `seed + episode index`, so runs repeat.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import rclpy
from builtin_interfaces.msg import Time as TimeMsg
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.ros.entry import run_node
from quantvla_ros.ros.params import declare
from quantvla_ros.sim.tasks import DEFAULT_TASKS

PARAMETERS: dict[str, object] = {
    "tasks": list(DEFAULT_TASKS),
    "episodes": 1,  # per task; 0 = keep going
    "seed": 0,
    "controller": "policy",  # "policy": execute received chunks; "expert": scripted expert
    "execute_steps": 5,
    "image_width": 112,
    "image_height": 112,
    "camera": "scene",
    "camera_topic": "/camera/image_raw",
    "joint_states_topic": "/joint_states",
    "instruction_topic": "/instruction",
    "action_topic": "/action_chunk",
    "episode_topic": "/sim/episode",
    "action_timeout": 5.0,
    "max_steps": 200,
}


def sim_stamp(seconds: float) -> TimeMsg:
    nanos = int(round(seconds * 1e9))
    return TimeMsg(sec=nanos // 10**9, nanosec=nanos % 10**9)


class SimNode(Node):
    def __init__(self) -> None:
        super().__init__("sim_node")
        p = declare(self, PARAMETERS)
        if p["controller"] not in ("policy", "expert"):
            raise QuantVLAError(f"Parameter controller {p['controller']!r} must be 'policy' or 'expert'.")
        if p["execute_steps"] < 1:
            raise QuantVLAError("Parameter execute_steps must be at least 1.")
        self.p = p
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self._image = self.create_publisher(Image, p["camera_topic"], 10)
        self._joints = self.create_publisher(JointState, p["joint_states_topic"], 10)
        self._instruction = self.create_publisher(String, p["instruction_topic"], latched)
        self._clock = self.create_publisher(Clock, "/clock", 10)
        self._episode = self.create_publisher(String, p["episode_topic"], latched)
        self._chunks: list[JointTrajectory] = []
        self.create_subscription(JointTrajectory, p["action_topic"], self._chunks.append, 10)
        self.results: list[dict] = []

    # ---- publishing ------------------------------------------------------------------------
    def _publish_observation(self, env, obs, now: float) -> None:
        stamp = sim_stamp(now)
        self._clock.publish(Clock(clock=stamp))
        image = Image(height=obs.image.shape[0], width=obs.image.shape[1], encoding="rgb8")
        image.step = 3 * image.width
        image.data = obs.image.tobytes()
        image.header.stamp, image.header.frame_id = stamp, "scene_camera"
        self._image.publish(image)
        joints = JointState(name=list(env.state_names), position=[float(v) for v in obs.state])
        joints.header.stamp = stamp
        self._joints.publish(joints)

    def _await_chunk(self, env, obs, now: float) -> np.ndarray | None:
        """The action chunk answering the observation stamped `now`, or None on shutdown."""
        wanted = sim_stamp(now)
        self._chunks.clear()
        self._publish_observation(env, obs, now)
        deadline = time.monotonic() + self.p["action_timeout"]
        while rclpy.ok():
            rclpy.spin_once(self, timeout_sec=0.01)
            for chunk in self._chunks:
                if chunk.header.stamp == wanted and list(chunk.joint_names) == list(env.action_names):
                    return np.array([pt.positions for pt in chunk.points], dtype=np.float32)
            if time.monotonic() > deadline:
                self.get_logger().warning("No action chunk for the last observation; publishing it again.")
                self._publish_observation(env, obs, now)
                deadline = time.monotonic() + self.p["action_timeout"]
        return None

    def _wait_for_policy(self) -> None:
        """Hold the first observation until a policy listens to the camera and publishes actions."""
        self.get_logger().info(f"Waiting for a policy on {self.p['camera_topic']} -> {self.p['action_topic']}")
        while rclpy.ok() and not (
            self._image.get_subscription_count() > 0 and self.count_publishers(self.p["action_topic"]) > 0
        ):
            rclpy.spin_once(self, timeout_sec=0.1)

    # ---- episodes --------------------------------------------------------------------------
    def run(self) -> list[dict]:
        from quantvla_ros.sim.env import SimEnv  # MuJoCo loads only when a simulator runs

        p = self.p
        if p["controller"] == "policy":
            self._wait_for_policy()
        episode = 0
        while rclpy.ok() and (p["episodes"] == 0 or episode < p["episodes"]):
            for task in p["tasks"]:
                seed = p["seed"] + episode
                with SimEnv(task, p["image_width"], p["image_height"], p["camera"], max_steps=p["max_steps"]) as env:
                    result = self._episode_loop(env, task, seed)
                if result is None:
                    return self.results
                self.results.append(result)
                self._episode.publish(String(data=json.dumps(result)))
                self.get_logger().info(
                    f"{task} seed {seed}: {'success' if result['success'] else 'failure'} in {result['steps']} steps"
                )
            episode += 1
        return self.results

    def _episode_loop(self, env, task: str, seed: int) -> dict | None:
        obs = env.reset(seed)
        self._instruction.publish(String(data=obs.instruction))
        now, success, done = 0.0, False, False
        while not done:
            if self.p["controller"] == "expert":
                actions = env.expert_action()[None]
                self._publish_observation(env, obs, now)
                rclpy.spin_once(self, timeout_sec=0.0)
            else:
                chunk = self._await_chunk(env, obs, now)
                if chunk is None:
                    return None
                actions = chunk[: self.p["execute_steps"]]
            for action in actions:
                obs, success, done = env.step(action)
                now += env.dt
                self._clock.publish(Clock(clock=sim_stamp(now)))
                if done:
                    break
        return {"task": task, "seed": seed, "success": success, "steps": env.steps}


def main(args: list[str] | None = None) -> int:
    return run_node("sim_node", SimNode, SimNode.run, args)


if __name__ == "__main__":
    sys.exit(main())
