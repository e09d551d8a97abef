"""The policy node: cameras + instruction + joint states in, action chunks out.

A managed (lifecycle) node: `configure` loads the policy, warms it up and starts listening,
`activate` starts publishing actions, `deactivate` stops them at once (no chunk leaves the node
after it returns, even one whose inference was in flight), `cleanup` frees the model. With
`autostart` (the default) the node configures and activates itself, so a plain launch serves
right away; a lifecycle manager sets it false and drives the transitions.

Subscription callbacks only store the newest message. A timer at `inference_rate` takes a
snapshot of the inputs and, if the first camera has a new frame since the last inference and every
required input is present and younger than `max_input_age` (on the node's clock, so sim time
works), hands it to a single worker thread that converts it, runs `Policy.prepare` (its errors
are the observation's: counted and dropped) and `Policy.act`, and
publishes a `trajectory_msgs/JointTrajectory`: one point per action step, `time_from_start =
(k+1)·dt`, `header.stamp` = the time of the observation used. The age is checked again when
the chunk is ready: a chunk from an observation that has grown older than `max_input_age`
while it was computed is dropped and counted. Inference never runs in a callback, and at most
one inference is in flight.

A bad input is dropped and counted under a cause from a fixed vocabulary, logged once per
cause; images above `max_image_pixels` are refused from their header, instructions are cut to
`max_instruction_length`. `/diagnostics` carries latency p50/p95, dropped frames, input ages,
the model and its quantization, and why actions are withheld when they are, all bounded in size
whatever a sender writes.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock as RosClock
from rclpy.clock import ClockType
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from quantvla_ros.data.mapping import TopicMapping
from quantvla_ros.data.messages import (
    MAX_PIXELS,
    MessageError,
    compressed_to_rgb,
    cut,
    image_to_rgb,
    joint_positions,
    stamp_nanoseconds,
)
from quantvla_ros.loader import load_policy
from quantvla_ros.models.policy import Observation, Policy
from quantvla_ros.ros.entry import run_node
from quantvla_ros.ros.params import declare, read, require
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
    "max_image_pixels": MAX_PIXELS,
    "max_instruction_length": 1000,
    "image_qos": "SENSOR_DATA",
    "instruction_qos": "RELIABLE_TRANSIENT_LOCAL",
    "joint_states_qos": "SENSOR_DATA",
    "action_qos": "RELIABLE",
    "seed": -1,
    "autostart": True,
}
REQUIRED = ["policy_path", "camera_names", "camera_topics", "state_joints", "action_joints"]
DTYPES = ("", "float32", "bfloat16", "float16")  # "" = bfloat16 on CUDA, float32 on CPU
# Any text in /diagnostics or a log line that a sender or an exception can make long is cut to this.
TEXT_LIMIT = 200
SUCCESS, FAILURE, ERROR = (
    TransitionCallbackReturn.SUCCESS,
    TransitionCallbackReturn.FAILURE,
    TransitionCallbackReturn.ERROR,
)


@dataclass
class Stored:
    msg: object
    received: Time  # node clock (sim time when use_sim_time), for input ages
    arrived: float  # perf_counter, for the node's own overhead
    used: bool = False


class PolicyNode(LifecycleNode):
    def __init__(self) -> None:
        super().__init__("policy_node")
        # Declared now so a lifecycle manager can set them before `configure` reads them.
        self._autostart = declare(self, PARAMETERS)["autostart"]
        self.policy: Policy | None = None
        self._lock = threading.Lock()
        self._active = False
        # Bumped on every deactivation: a chunk computed before it is never published after it.
        self._epoch = 0
        self._worker: ThreadPoolExecutor | None = None
        self._owned: list[tuple] = []  # (destroy method, entity) made by configure
        self._failure: BaseException | None = None
        if self._autostart:
            if self.trigger_configure() != SUCCESS:
                raise self._failure
            self.trigger_activate()

    # ---- lifecycle -------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as e:
            self._release()
            self._failure = e
            user_error = isinstance(e, (ValueError, FileNotFoundError))
            if not self._autostart:  # with autostart, main() reports it and exits
                detail = str(e) if user_error else traceback.format_exc()
                self.get_logger().error(f"Configuration failed: {detail}")
            return FAILURE if user_error else ERROR
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self._active = True
            self._withheld = "waiting for inputs"
        self.get_logger().info(f"Active: publishing actions on {self._p['action_topic']}.")
        return SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self._active = False
            self._epoch += 1
        self.get_logger().info("Inactive: no actions are published until the node is activated again.")
        return SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return SUCCESS

    def destroy_node(self) -> None:
        self._release()
        super().destroy_node()

    def _configure(self) -> None:
        p = read(self, PARAMETERS)
        require(p, REQUIRED, "config/policy.yaml")
        self.mapping = TopicMapping.from_params(p)
        if p["dtype"] not in DTYPES:
            raise ValueError(f"Parameter dtype {p['dtype']!r} must be one of float32, bfloat16, float16 or empty.")
        positive = ("inference_rate", "action_dt", "max_input_age", "max_image_pixels", "max_instruction_length")
        if any(p[name] <= 0 for name in positive):
            raise ValueError(f"Parameters {', '.join(positive)} must be positive.")
        dtype = getattr(torch, p["dtype"]) if p["dtype"] else None
        self.policy = load_policy(
            p["policy_path"],
            device=p["device"],
            dtype=dtype,
            asset_id=p["asset_id"] or None,
            action_dt=p["action_dt"],
            engine=p["engine"],
        )
        self.mapping.check_policy(self.policy)
        self._p = p
        self.max_age = p["max_input_age"]
        self.rng = np.random.default_rng(None if p["seed"] < 0 else p["seed"])
        self._latest: dict[str, Stored | None] = {}
        self._busy = False
        self._latencies: list[float] = []
        # Newest input's arrival -> publish, minus the model: timer wait, conversion, messages.
        self._overheads: list[float] = []
        self._inferences = 0
        self._dropped_frames = 0
        self._stale_at_publish = 0
        self._instructions_cut = 0
        self._bad_messages: dict[str, int] = {}  # cause (a fixed vocabulary) -> count
        self._last_bad = ""
        self._withheld = "inactive"
        self._error = ""
        self._failed_types: set[str] = set()
        self._warm_up()
        # Subscriptions, publishers and timers are created only after every check has passed.
        qos = {name: qos_from_string(p[f"{name}_qos"]) for name in ("image", "instruction", "joint_states")}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        for name, topic, kind in zip(
            self.mapping.camera_names, self.mapping.camera_topics, self.mapping.camera_types, strict=True
        ):
            msg_type = CompressedImage if kind == "compressed" else Image
            self._own_subscription(msg_type, topic, lambda m, k=f"camera:{name}": self._store(k, m), qos["image"])
        self._own_subscription(String, self.mapping.instruction_topic, self._store_instruction, qos["instruction"])
        self._own_subscription(
            JointState, self.mapping.joint_states_topic, lambda m: self._store("joint_states", m), qos["joint_states"]
        )
        self._actions = self._own(
            self.destroy_publisher,
            self.create_publisher(JointTrajectory, p["action_topic"], qos_from_string(p["action_qos"], 10)),
        )
        self._diagnostics = self._own(
            self.destroy_publisher, self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        )
        # Wall-clock timers: under sim time a simulator may hold /clock still until it gets actions.
        steady = RosClock(clock_type=ClockType.STEADY_TIME)
        self._own(self.destroy_timer, self.create_timer(1.0 / p["inference_rate"], self._tick, clock=steady))
        self._own(self.destroy_timer, self.create_timer(1.0, self._publish_diagnostics, clock=steady))
        quant = self.policy.quant_config
        self.get_logger().info(
            f"Serving {p['policy_path']} ({'float' if quant is None else quant['method']}) on {p['device']}: "
            f"cameras {dict(zip(self.mapping.camera_topics, self.mapping.camera_names, strict=True))}, "
            f"actions on {p['action_topic']} every {1.0 / p['inference_rate']:.3f} s once active"
        )

    def _own(self, destroy, entity):
        self._owned.append((destroy, entity))
        return entity

    def _own_subscription(self, msg_type, topic: str, callback, qos) -> None:
        self._own(self.destroy_subscription, self.create_subscription(msg_type, topic, callback, qos))

    def _release(self) -> None:
        """Undo configure: stop publishing, let an inference in flight finish, free the model."""
        with self._lock:
            self._active = False
            self._epoch += 1
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        for destroy, entity in reversed(self._owned):
            destroy(entity)
        self._owned.clear()
        if self.policy is not None:
            on_cuda = self.policy.device.type == "cuda"
            self.policy = None
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()

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

    def _store_instruction(self, msg: String) -> None:
        limit = self._p["max_instruction_length"]
        if len(msg.data) > limit:
            # A cut here keeps a huge instruction from being re-tokenized on every inference.
            with self._lock:
                self._instructions_cut += 1
                first = self._instructions_cut == 1
            if first:
                self.get_logger().warning(
                    f"An instruction of {len(msg.data)} characters was cut to max_instruction_length={limit}; "
                    "send shorter instructions or raise the limit (logged once; see instructions_cut)."
                )
            msg = String(data=msg.data[:limit])
        self._store("instruction", msg)

    def _required(self) -> list[str]:
        return [f"camera:{c}" for c in self.mapping.camera_names] + ["instruction", "joint_states"]

    def _tick(self) -> None:
        with self._lock:
            if self._busy or not self._active:
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
            epoch = self._epoch
        self._worker.submit(self._infer, snapshot, epoch)

    def _age(self, stored: Stored, now: Time) -> float:
        return (now - stored.received).nanoseconds * 1e-9

    def _bad_input(self, key: str | None, error: MessageError) -> None:
        """Count a bad input under its cause and log the cause once; forget the message when it is
        one input's (`key`), so the next good one is used as usual."""
        what, text = key or "observation", cut(str(error), TEXT_LIMIT)
        with self._lock:
            if key is not None:
                self._latest[key] = None
            first = error.cause not in self._bad_messages
            self._bad_messages[error.cause] = self._bad_messages.get(error.cause, 0) + 1
            self._last_bad = f"{what}: {text}"
            self._withheld = f"bad input dropped ({error.cause})"
        if first:
            self.get_logger().warning(f"Dropping {what} message: {text} (logged once per cause).")

    # ---- worker ----------------------------------------------------------------------------
    def _observation(self, snapshot: dict[str, Stored]) -> tuple[Observation, Time]:
        """Convert the snapshot; a bad message is dropped (MessageError) under its input's key."""
        limit = self._p["max_image_pixels"]
        images = {}
        observed = None
        for name, kind in zip(self.mapping.camera_names, self.mapping.camera_types, strict=True):
            key = f"camera:{name}"
            stored = snapshot[key]
            convert = compressed_to_rgb if kind == "compressed" else image_to_rgb
            try:
                images[name] = convert(stored.msg, limit)
                if observed is None:
                    observed = self._observed(stored)
            except MessageError as e:
                self._bad_input(key, e)
                raise
        try:
            state = joint_positions(snapshot["joint_states"].msg, list(self.mapping.state_joints))
        except MessageError as e:
            self._bad_input("joint_states", e)
            raise
        return Observation(images, snapshot["instruction"].msg.data, state), observed

    def _observed(self, first: Stored) -> Time:
        """The first camera's stamp, or its arrival when unstamped; a stamp from the future is refused."""
        stamp = stamp_nanoseconds(first.msg.header.stamp)
        if not stamp:
            return first.received
        observed = Time(nanoseconds=stamp, clock_type=first.received.clock_type)
        ahead = (observed - first.received).nanoseconds * 1e-9
        if ahead > self.max_age:
            raise MessageError(
                "stamp",
                f"header stamp is {ahead:.3g} s ahead of this node's clock; synchronize the sender's clock "
                "(or, under use_sim_time, stamp with /clock)",
            )
        return observed

    def _infer(self, snapshot: dict[str, Stored], epoch: int) -> None:
        try:
            obs, observed = self._observation(snapshot)
            cfg = self.policy.model.cfg
            noise = self.rng.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
            start = time.perf_counter()
            try:
                inputs = self.policy.prepare(obs)
            except ValueError as e:
                # prepare checks the observation (image shapes, prompt length, state): its errors are
                # the input's; an error of the model itself (act) stays an inference failure.
                self._bad_input(None, MessageError("observation", f"the policy refused the observation: {e}"))
                return
            chunk = self.policy.act(inputs, noise)
            latency = time.perf_counter() - start
            if not np.isfinite(chunk.actions).all():
                with self._lock:
                    self._withheld = "the policy produced NaN or Inf actions for the last observation"
                return
            self._publish(self._trajectory(chunk.actions, observed), snapshot, epoch, latency)
        except MessageError:
            pass  # dropped and counted by _observation
        except Exception as e:
            self._failed(e)
        finally:
            with self._lock:
                self._busy = False

    def _publish(self, msg: JointTrajectory, snapshot: dict[str, Stored], epoch: int, latency: float) -> None:
        inputs = [s for k, s in snapshot.items() if k != "instruction"]
        with self._lock:
            # Under the lock that deactivation takes, so once it returns nothing more goes out.
            if not self._active or epoch != self._epoch:
                return
            age = max(self._age(s, self.get_clock().now()) for s in inputs)
            if age > self.max_age:
                self._stale_at_publish += 1
                self._withheld = (
                    f"the observation was {age:.3f} s old when its actions were ready, more than "
                    f"max_input_age={self.max_age} s"
                )
                return
            self._actions.publish(msg)
            overhead = time.perf_counter() - max(s.arrived for s in inputs) - latency
            self._latencies = (self._latencies + [latency])[-200:]
            self._overheads = (self._overheads + [overhead])[-200:]
            self._inferences += 1
            self._withheld = ""
            self._error = ""

    def _failed(self, error: Exception) -> None:
        """An inference that failed for a reason other than its input: an ERROR, logged once per kind."""
        kind = type(error).__name__
        with self._lock:
            self._error = cut(f"{kind}: {error}", TEXT_LIMIT)
            first = kind not in self._failed_types
            self._failed_types.add(kind)
        if first:
            self.get_logger().error(f"Inference failed (logged once per kind of error):\n{traceback.format_exc()}")

    def _trajectory(self, actions: np.ndarray, observed: Time) -> JointTrajectory:
        msg = JointTrajectory()
        msg.header.stamp = observed.to_msg()
        msg.joint_names = list(self.mapping.action_joints)
        dt = self._p["action_dt"]
        for k, row in enumerate(actions):
            t = (k + 1) * dt
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
            active, withheld, error = self._active, self._withheld, self._error
            values = {
                "state": "active" if active else "inactive",
                "inferences": str(self._inferences),
                "dropped_frames": str(self._dropped_frames),
                "stale_at_publish": str(self._stale_at_publish),
                "instructions_cut": str(self._instructions_cut),
                "bad_messages": ", ".join(f"{k}: {v}" for k, v in sorted(self._bad_messages.items())) or "0",
                "last_bad_message": self._last_bad or "none",
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
        if not active:
            status.level, status.message = DiagnosticStatus.OK, "inactive: no actions until the node is activated"
        elif error:
            status.level, status.message = DiagnosticStatus.ERROR, f"inference failed: {error}"
        elif withheld:
            status.level, status.message = DiagnosticStatus.WARN, f"actions withheld: {withheld}"
        else:
            status.level, status.message = DiagnosticStatus.OK, "publishing actions"
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = now.to_msg()
        self._diagnostics.publish(array)


def main(args: list[str] | None = None) -> int:
    return run_node("policy_node", PolicyNode, None, args)


if __name__ == "__main__":
    sys.exit(main())
