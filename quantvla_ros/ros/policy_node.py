"""The policy node: cameras + instruction + joint states in, action chunks out.

Subscription callbacks only store the newest message. A timer at `inference_rate` takes a
snapshot of the inputs and, if the first camera has a new frame since the last inference and every
required input is present, fresh (younger than `max_input_age` on the node's clock, so sim
time works) and well-formed, hands it to a single
worker thread that converts it, runs `Policy.predict` and publishes a
`trajectory_msgs/JointTrajectory`: one point per action step, `time_from_start = (k+1)·dt`,
`header.stamp` = the time of the observation used. Inference never runs in a callback, and at
most one inference is in flight. A bad message is logged once per cause and dropped; nothing a
peer sends stops the node. `/diagnostics` carries latency p50/p95, dropped frames, input ages,
the model and its quantization, and why actions are withheld when they are.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock as RosClock
from rclpy.clock import ClockType
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from quantvla_ros.data.mapping import TopicMapping
from quantvla_ros.data.messages import MessageError, compressed_to_rgb, image_to_rgb, joint_positions, stamp_seconds
from quantvla_ros.loader import load_policy
from quantvla_ros.models.policy import Observation, Policy
from quantvla_ros.ros.entry import run_node
from quantvla_ros.ros.params import declare, require
from quantvla_ros.ros.qos import qos_from_string

# Defaults; a bare type marks a parameter the params file must set.
PARAMETERS: dict[str, object] = {
    "policy_path": Parameter.Type.STRING,
    "asset_id": "",
    "device": "cpu",
    "dtype": "",
    "engine": "auto",
    "camera_names": Parameter.Type.STRING_ARRAY,
    "camera_topics": Parameter.Type.STRING_ARRAY,
    "camera_types": Parameter.Type.STRING_ARRAY,
    "instruction_topic": "/instruction",
    "joint_states_topic": "/joint_states",
    "state_joints": Parameter.Type.STRING_ARRAY,
    "action_joints": Parameter.Type.STRING_ARRAY,
    "action_topic": "/action_chunk",
    "action_dt": 0.1,
    "inference_rate": 5.0,
    "max_input_age": 0.5,
    "image_qos": "SENSOR_DATA",
    "instruction_qos": "RELIABLE_TRANSIENT_LOCAL",
    "joint_states_qos": "SENSOR_DATA",
    "action_qos": "RELIABLE",
    "seed": -1,
}
REQUIRED = ["policy_path", "camera_names", "camera_topics", "state_joints", "action_joints"]
DTYPES = ("", "float32", "bfloat16", "float16")  # "" = bfloat16 on CUDA, float32 on CPU


@dataclass
class Stored:
    msg: object
    received: Time  # node clock (sim time when use_sim_time), for input ages
    arrived: float  # perf_counter, for the node's own overhead
    used: bool = False


class PolicyNode(Node):
    def __init__(self) -> None:
        super().__init__("policy_node")
        p = declare(self, PARAMETERS)
        require(p, REQUIRED, "config/policy.yaml")
        self.mapping = TopicMapping.from_params(p)
        if p["dtype"] not in DTYPES:
            raise ValueError(f"Parameter dtype {p['dtype']!r} must be one of float32, bfloat16, float16 or empty.")
        if p["inference_rate"] <= 0 or p["action_dt"] <= 0 or p["max_input_age"] <= 0:
            raise ValueError("Parameters inference_rate, action_dt and max_input_age must be positive.")
        dtype = getattr(torch, p["dtype"]) if p["dtype"] else None
        self.policy: Policy = load_policy(
            p["policy_path"],
            device=p["device"],
            dtype=dtype,
            asset_id=p["asset_id"] or None,
            action_dt=p["action_dt"],
            engine=p["engine"],
        )
        self._check_mapping()
        self.action_dt = p["action_dt"]
        self.max_age = p["max_input_age"]
        self.rng = np.random.default_rng(None if p["seed"] < 0 else p["seed"])

        self._lock = threading.Lock()
        self._latest: dict[str, Stored | None] = {}
        self._busy = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._latencies: list[float] = []
        # Newest input's arrival -> publish, minus the model: timer wait, conversion, messages.
        self._overheads: list[float] = []
        self._inferences = 0
        self._dropped_frames = 0
        self._bad_messages: dict[str, int] = {}
        self._withheld = "waiting for inputs"
        self._error = ""

        self._warm_up()
        image_qos = qos_from_string(p["image_qos"])
        for name, topic, kind in zip(
            self.mapping.camera_names, self.mapping.camera_topics, self.mapping.camera_types, strict=True
        ):
            msg_type = CompressedImage if kind == "compressed" else Image
            self.create_subscription(msg_type, topic, lambda m, k=f"camera:{name}": self._store(k, m), image_qos)
        self.create_subscription(
            String,
            self.mapping.instruction_topic,
            lambda m: self._store("instruction", m),
            qos_from_string(p["instruction_qos"]),
        )
        self.create_subscription(
            JointState,
            self.mapping.joint_states_topic,
            lambda m: self._store("joint_states", m),
            qos_from_string(p["joint_states_qos"]),
        )
        self._actions = self.create_publisher(JointTrajectory, p["action_topic"], qos_from_string(p["action_qos"], 10))
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Wall-clock timers: under sim time a simulator may hold /clock still until it gets actions.
        steady = RosClock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(1.0 / p["inference_rate"], self._tick, clock=steady)
        self.create_timer(1.0, self._publish_diagnostics, clock=steady)
        quant = self.policy.quant_config
        self.get_logger().info(
            f"Serving {p['policy_path']} ({'float' if quant is None else quant['method']}) on {p['device']}: "
            f"cameras {dict(zip(self.mapping.camera_topics, self.mapping.camera_names, strict=True))}, "
            f"actions on {p['action_topic']} every {1.0 / p['inference_rate']:.3f} s"
        )

    # ---- setup -----------------------------------------------------------------------------
    def _check_mapping(self) -> None:
        policy, mapping = self.policy, self.mapping
        unknown = [c for c in mapping.camera_names if c not in policy.camera_names]
        if unknown:
            raise ValueError(f"camera_names {unknown} are not cameras of this policy; use {list(policy.camera_names)}.")
        if policy.state_dim is not None and len(mapping.state_joints) != policy.state_dim:
            raise ValueError(
                f"state_joints lists {len(mapping.state_joints)} joints but the policy's state has {policy.state_dim}."
            )
        if len(mapping.action_joints) != policy.action_dim:
            raise ValueError(
                f"action_joints lists {len(mapping.action_joints)} joints but the policy outputs {policy.action_dim}."
            )

    def _warm_up(self) -> None:
        """One inference before the first publish, so the first real one is not slow."""
        size = self.policy.model.cfg.image_size
        obs = Observation(
            images={c: np.zeros((size, size, 3), np.uint8) for c in self.mapping.camera_names},
            instruction="warm up",
            state=np.zeros(len(self.mapping.state_joints), np.float32),
        )
        self.policy.predict(obs)

    # ---- callbacks -------------------------------------------------------------------------
    def _store(self, key: str, msg) -> None:
        with self._lock:
            previous = self._latest.get(key)
            if key.startswith("camera:") and previous is not None and not previous.used:
                self._dropped_frames += 1
            self._latest[key] = Stored(msg, self.get_clock().now(), time.perf_counter())

    def _required(self) -> list[str]:
        return [f"camera:{c}" for c in self.mapping.camera_names] + ["instruction", "joint_states"]

    def _tick(self) -> None:
        with self._lock:
            if self._busy:
                return
            now = self.get_clock().now()
            missing = [k for k in self._required() if self._latest.get(k) is None]
            stale = [
                k
                for k in self._required()
                if k not in missing and k != "instruction" and self._age(self._latest[k], now) > self.max_age
            ]
            if missing or stale:
                self._withheld = "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(missing)}" if missing else "",
                        f"older than {self.max_age} s: {', '.join(stale)}" if stale else "",
                    )
                    if part
                )
                return
            snapshot = {k: self._latest[k] for k in self._required()}
            if snapshot[f"camera:{self.mapping.camera_names[0]}"].used:
                return  # no new frame of the first camera since the last inference: nothing new to act on
            for stored in snapshot.values():
                stored.used = True
            self._busy = True
        self._worker.submit(self._infer, snapshot)

    def _age(self, stored: Stored, now: Time) -> float:
        return (now - stored.received).nanoseconds * 1e-9

    def _drop(self, key: str, error: MessageError) -> None:
        """Forget a bad message and log its cause once; later good messages are used as usual."""
        with self._lock:
            self._latest[key] = None
            first = error.cause not in self._bad_messages
            self._bad_messages[error.cause] = self._bad_messages.get(error.cause, 0) + 1
        if first:
            self.get_logger().warning(f"Dropping {key} message: {error} (logged once per cause).")

    # ---- worker ----------------------------------------------------------------------------
    def _observation(self, snapshot: dict[str, Stored]) -> tuple[Observation, Time]:
        images = {}
        for name, kind in zip(self.mapping.camera_names, self.mapping.camera_types, strict=True):
            key = f"camera:{name}"
            try:
                msg = snapshot[key].msg
                images[name] = compressed_to_rgb(msg) if kind == "compressed" else image_to_rgb(msg)
            except MessageError as e:
                self._drop(key, e)
                raise
        try:
            state = joint_positions(snapshot["joint_states"].msg, list(self.mapping.state_joints))
        except MessageError as e:
            self._drop("joint_states", e)
            raise
        if not np.all(np.isfinite(state)):
            self._drop("joint_states", MessageError("joint-nan", "joint state contains NaN or Inf"))
            raise MessageError("joint-nan", "joint state contains NaN or Inf")
        first = snapshot[f"camera:{self.mapping.camera_names[0]}"]
        stamp = first.msg.header.stamp
        observed = Time.from_msg(stamp) if stamp_seconds(stamp) > 0 else first.received
        return Observation(images, snapshot["instruction"].msg.data, state), observed

    def _infer(self, snapshot: dict[str, Stored]) -> None:
        try:
            obs, observed = self._observation(snapshot)
            cfg = self.policy.model.cfg
            noise = self.rng.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
            start = time.perf_counter()
            chunk = self.policy.predict(obs, noise)
            latency = time.perf_counter() - start
            self._actions.publish(self._trajectory(chunk.actions, observed))
            newest = max(s.arrived for k, s in snapshot.items() if k != "instruction")
            overhead = time.perf_counter() - newest - latency
            with self._lock:
                self._latencies = (self._latencies + [latency])[-200:]
                self._overheads = (self._overheads + [overhead])[-200:]
                self._inferences += 1
                self._withheld = ""
                self._error = ""
        except MessageError as e:
            with self._lock:
                self._withheld = f"bad input dropped ({e.cause})"
        except Exception as e:
            with self._lock:
                first = self._error != str(e)
                self._error = str(e)
            if first:
                self.get_logger().error(f"Inference failed: {e}")
        finally:
            with self._lock:
                self._busy = False

    def _trajectory(self, actions: np.ndarray, observed: Time) -> JointTrajectory:
        msg = JointTrajectory()
        msg.header.stamp = observed.to_msg()
        msg.joint_names = list(self.mapping.action_joints)
        for k, row in enumerate(actions):
            t = (k + 1) * self.action_dt
            point = JointTrajectoryPoint(positions=[float(v) for v in row])
            point.time_from_start = Duration(sec=int(t), nanosec=int(round((t - int(t)) * 1e9)))
            msg.points.append(point)
        return msg

    # ---- diagnostics -----------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        with self._lock:
            now = self.get_clock().now()
            latencies = np.array(self._latencies) * 1e3
            overheads = np.array(self._overheads) * 1e3
            ages = {k: (self._age(v, now) if v is not None else None) for k, v in self._latest.items()}
            withheld, error = self._withheld, self._error
            values = {
                "inferences": str(self._inferences),
                "dropped_frames": str(self._dropped_frames),
                "bad_messages": ", ".join(f"{k}: {v}" for k, v in sorted(self._bad_messages.items())) or "0",
            }
        quant = self.policy.quant_config
        values.update(
            latency_p50_ms=f"{np.percentile(latencies, 50):.2f}" if latencies.size else "n/a",
            latency_p95_ms=f"{np.percentile(latencies, 95):.2f}" if latencies.size else "n/a",
            node_overhead_p50_ms=f"{np.percentile(overheads, 50):.2f}" if overheads.size else "n/a",
            model=f"{self.policy.model.display_name} from {self.policy.info.path}",
            quantization="float" if quant is None else f"{quant['method']} W{quant['w_bits']}A{quant['a_bits']}",
            withheld=withheld or "no",
        )
        for key in self._required():
            age = ages.get(key)
            values[f"age_{key}"] = "missing" if age is None else f"{age:.3f}"
        status = DiagnosticStatus(name="quantvla_ros: policy_node", hardware_id=str(self.policy.info.path))
        if error:
            status.level, status.message = DiagnosticStatus.ERROR, f"inference failed: {error}"
        elif withheld:
            status.level, status.message = DiagnosticStatus.WARN, f"actions withheld: {withheld}"
        else:
            status.level, status.message = DiagnosticStatus.OK, "publishing actions"
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = now.to_msg()
        self._diagnostics.publish(array)

    def destroy_node(self) -> None:
        self._worker.shutdown(wait=True)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return run_node("policy_node", PolicyNode, None, args)


if __name__ == "__main__":
    sys.exit(main())
