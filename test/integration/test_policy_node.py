"""The policy node as launch starts it (entry point + params file), over real DDS on loopback."""

from __future__ import annotations

import numpy as np
import pytest
from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticStatus
from node_fixtures import ACTION_JOINTS, DT, STATE_JOINTS, joints, jpeg, params, raw_image, start_node, stop
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

from conftest import ACTION_DIM, STATE_DIM

pytestmark = pytest.mark.integration


def test_node_publishes_action_chunks_and_diagnostics(policy_path, peer, tmp_path):
    proc = start_node(params(policy_path), tmp_path)
    try:
        peer.instruction.publish(String(data="pick up the red cup"))
        assert peer.wait_for(lambda: peer.trajectories, 60, peer.good_inputs(stamp=1234.5)), stop(proc)
        msg = peer.trajectories[-1]
        assert list(msg.joint_names) == ACTION_JOINTS
        assert len(msg.points) == 5
        times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
        np.testing.assert_allclose(times, [DT * (k + 1) for k in range(5)], atol=1e-6)
        assert all(len(p.positions) == ACTION_DIM and np.isfinite(p.positions).all() for p in msg.points)
        assert msg.header.stamp.sec == 1234 and abs(msg.header.stamp.nanosec - 5e8) < 1e3
        assert peer.wait_for(
            lambda: peer.last_status() is not None and peer.last_status().level == DiagnosticStatus.OK,
            10,
            peer.good_inputs(),
        ), peer.last_status()
        values = {kv.key: kv.value for kv in peer.last_status().values}
        assert values["quantization"] == "float" and float(values["latency_p50_ms"]) > 0
        assert "age_camera:base_0_rgb" in values and values["withheld"] == "no"
    finally:
        stop(proc)


def test_bad_messages_are_dropped_and_the_node_keeps_serving(policy_path, peer, tmp_path):
    proc = start_node(params(policy_path), tmp_path)
    try:
        peer.instruction.publish(String(data="open the top drawer"))
        assert peer.wait_for(lambda: peer.trajectories, 60, peer.good_inputs()), stop(proc)
        bad = {
            "base": [
                raw_image(encoding="yuv422"),
                Image(height=30, width=40, encoding="rgb8", step=120, data=b"\x00" * 50),
            ],
            "wrist": [CompressedImage(format="jpeg", data=b"not a jpeg at all")],
            "joints": [
                joints(names=["elbow"] * STATE_DIM),
                joints(values=[np.nan] * STATE_DIM),
                JointState(name=STATE_JOINTS, position=[0.0]),
            ],
        }
        for topic, messages in bad.items():
            for message in messages:

                def one_bad_input(topic=topic, message=message) -> None:
                    peer.base.publish(message if topic == "base" else raw_image())
                    peer.wrist.publish(message if topic == "wrist" else jpeg())
                    peer.joints.publish(message if topic == "joints" else joints())

                peer.spin(0.6, one_bad_input)
        good = peer.good_inputs()
        count = len(peer.trajectories)
        assert peer.wait_for(lambda: len(peer.trajectories) >= count + 3, 30, good), stop(proc)
        assert proc.poll() is None
        causes = ("encoding", "data", "decode", "joint-missing", "joint-nan", "joint-size")

        def bad_messages() -> str:
            status = peer.last_status()
            return "" if status is None else {kv.key: kv.value for kv in status.values}.get("bad_messages", "")

        # Diagnostics go out once a second, so the status that lists the last bad input may be the next one.
        assert peer.wait_for(lambda: all(c in bad_messages() for c in causes), 5, good), bad_messages()

        def mono_and_bgr() -> None:
            peer.base.publish(raw_image(encoding="mono8", pad=3))
            peer.base.publish(raw_image(encoding="bgr8", pad=0))
            peer.wrist.publish(jpeg())
            peer.joints.publish(joints())

        count = len(peer.trajectories)
        assert peer.wait_for(lambda: len(peer.trajectories) > count + 1, 20, mono_and_bgr)
    finally:
        out = stop(proc)
    assert out.count("Dropping camera:base_0_rgb message: image encoding 'yuv422'") == 1


def test_stale_or_missing_inputs_withhold_actions(policy_path, peer, tmp_path):
    proc = start_node(params(policy_path), tmp_path)
    try:
        # No instruction yet: inputs flow, but nothing may be published.
        peer.spin(3.0, peer.good_inputs())
        assert not peer.trajectories
        assert peer.wait_for(lambda: peer.last_status() is not None, 10, peer.good_inputs()), stop(proc)
        status = peer.last_status()
        assert status.level == DiagnosticStatus.WARN and "missing instruction" in status.message
        peer.instruction.publish(String(data="push the green button"))
        assert peer.wait_for(lambda: peer.trajectories, 60, peer.good_inputs()), stop(proc)

        def cameras_only() -> None:
            peer.base.publish(raw_image())
            peer.wrist.publish(jpeg())

        peer.spin(3.0, cameras_only)  # joint states now older than max_input_age; any inference in flight ends
        count = len(peer.trajectories)
        peer.spin(2.0, cameras_only)
        assert len(peer.trajectories) == count
        status = peer.last_status()
        assert (
            status.level == DiagnosticStatus.WARN
            and "older than" in status.message
            and "joint_states" in status.message
        )
    finally:
        stop(proc)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"policy_path": "/nonexistent/policy"}, "does not exist"),
        ({"camera_names": ["top_cam", "left_wrist_0_rgb"]}, "are not cameras of this policy"),
        ({"action_joints": ["a", "b"]}, "action_joints lists 2 joints but the policy outputs 4"),
        ({"camera_types": ["raw", "h264"]}, "camera_types ['h264'] are not allowed"),
        ({"image_qos": "FAST"}, "QoS 'FAST' is not known"),
        ({"max_image_pixels": 0}, "max_image_pixels, max_instruction_length must be positive"),
    ],
    ids=["bad-path", "unknown-camera", "action-joints", "image-type", "qos", "pixel-limit"],
)
def test_configuration_errors_exit_with_one_sentence(policy_path, tmp_path, overrides, message):
    proc = start_node({**params(policy_path), **overrides}, tmp_path)
    try:
        proc.wait(timeout=60)
    finally:
        out = stop(proc)
    assert proc.returncode == 2
    assert message in out and "Traceback" not in out


def test_use_sim_time_stamps_and_ages_follow_clock(policy_path, peer, tmp_path):
    clock = peer.node.create_publisher(Clock, "/clock", 10)
    sim = {"t": 500.0}

    def inputs_and_clock() -> None:
        sim["t"] += 0.01
        clock.publish(Clock(clock=TimeMsg(sec=int(sim["t"]), nanosec=int((sim["t"] % 1) * 1e9))))
        peer.good_inputs(stamp=0.0)()  # unstamped frames: the node stamps them on its (sim) clock

    proc = start_node({**params(policy_path), "use_sim_time": True}, tmp_path)
    try:
        peer.instruction.publish(String(data="reach the target"))
        assert peer.wait_for(lambda: peer.trajectories, 60, inputs_and_clock), stop(proc)
        stamp = peer.trajectories[-1].header.stamp
        assert 500.0 <= stamp.sec + stamp.nanosec * 1e-9 <= sim["t"]
    finally:
        stop(proc)
