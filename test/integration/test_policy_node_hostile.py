"""The policy node against tiny hostile messages, slow inferences and stops: one test per defect of #12."""

from __future__ import annotations

import signal
import time

import groot_fixtures
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from node_fixtures import joints, jpeg, jpeg_claiming, params, raw_image, stamp_now, start_node, stop
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

pytestmark = pytest.mark.integration


def statuses(peer) -> list[DiagnosticStatus]:
    return [s for d in peer.diagnostics for s in d.status if s.name == "quantvla_ros: policy_node"]


def test_actions_from_an_observation_that_aged_during_inference_are_not_published(slow_policy_path, peer, tmp_path):
    # Inputs are fresh when the snapshot is taken (sent every 50 ms), but one inference takes about
    # a second, so every chunk is older than max_input_age by the time it is ready.
    proc = start_node(params(slow_policy_path, max_input_age=0.3), tmp_path)
    try:
        peer.instruction.publish(String(data="pick up the red cup"))
        fresh = peer.good_inputs(stamp=None)
        assert peer.wait_for(lambda: int(peer.last_values().get("stale_at_publish", 0)) >= 2, 90, fresh), stop(proc)
        assert not peer.trajectories, [
            (received - t.header.stamp.sec * 10**9 - t.header.stamp.nanosec) * 1e-9
            for t, (_, received) in zip(peer.trajectories, peer.timestamps, strict=True)
        ]
        status = peer.last_status()
        assert status.level == DiagnosticStatus.WARN and "old when its actions were ready" in status.message
    finally:
        out = stop(proc)
    assert "ERROR" not in out


def test_bad_inputs_and_stamps_are_dropped_not_inference_failures(policy_path, peer, tmp_path):
    proc = start_node(params(policy_path), tmp_path)
    try:
        peer.instruction.publish(String(data="open the top drawer"))
        assert peer.wait_for(lambda: peer.trajectories, 60, peer.good_inputs(stamp=None)), stop(proc)
        unrepresentable = raw_image()
        unrepresentable.header.stamp.sec, unrepresentable.header.stamp.nanosec = 2**31 - 1, 2**32 - 1
        negative = raw_image()
        negative.header.stamp.sec = -5
        future = raw_image(stamp=time.time() + 1000)
        bomb = CompressedImage(format="jpeg", data=jpeg_claiming(65500, 65500))
        for base, wrist in [(unrepresentable, jpeg()), (negative, jpeg()), (future, jpeg()), (raw_image(), bomb)]:

            def send(base=base, wrist=wrist) -> None:
                peer.base.publish(base)
                peer.wrist.publish(wrist)
                peer.joints.publish(joints())

            peer.spin(0.8, send)
        # 300:1 reached a zero width in the resize and failed the inference.
        count = len(peer.trajectories)

        def wide() -> None:
            image = raw_image(width=300, height=1, pad=0)
            stamp_now(image)
            peer.base.publish(image)
            peer.wrist.publish(jpeg())
            peer.joints.publish(joints())

        assert peer.wait_for(lambda: len(peer.trajectories) >= count + 3, 30, wide), stop(proc)
        # No wrapped-around or future stamp was echoed.
        assert all(abs(t.header.stamp.sec - time.time()) < 60 for t in peer.trajectories), peer.trajectories
        assert peer.wait_for(lambda: "stamp: " in peer.last_values().get("bad_messages", ""), 5, wide)
        assert "pixels: " in peer.last_values()["bad_messages"]
        assert all(s.level != DiagnosticStatus.ERROR for s in statuses(peer))
    finally:
        out = stop(proc)
    assert "ERROR" not in out and "Inference failed" not in out and "Traceback" not in out


def test_an_observation_the_policy_refuses_is_bad_input(peer, tmp_path):
    # GR00T refuses (in Policy.prepare) an instruction whose prompt exceeds its max_token_len.
    folder = groot_fixtures.write_checkpoint(tmp_path / "groot", "nvidia")
    state_joints = [f"joint{i}" for i in range(groot_fixtures.STATE_DIM)]
    overrides = {
        "camera_names": ["front", "wrist"],
        "state_joints": state_joints,
        "action_joints": [f"act{i}" for i in range(groot_fixtures.ACTION_DIM)],
    }
    proc = start_node(params(folder, **overrides), tmp_path)
    state = JointState(name=state_joints, position=[0.5] * len(state_joints))

    def inputs() -> None:
        image = raw_image()
        stamp_now(image)
        peer.base.publish(image)
        peer.wrist.publish(jpeg())
        peer.joints.publish(state)

    try:
        peer.instruction.publish(String(data="pick up the red cup"))
        assert peer.wait_for(lambda: peer.trajectories, 60, inputs), stop(proc)
        peer.instruction.publish(String(data=" ".join(groot_fixtures.SENTENCES) * 20))
        assert peer.wait_for(lambda: "observation" in peer.last_values().get("bad_messages", ""), 20, inputs)
        assert "max_token_len" in peer.last_values()["last_bad_message"]
        assert all(s.level != DiagnosticStatus.ERROR for s in statuses(peer))
        count = len(peer.trajectories)
        peer.instruction.publish(String(data="pick up the red cup"))
        assert peer.wait_for(lambda: len(peer.trajectories) > count, 20, inputs)
    finally:
        out = stop(proc)
    assert "Inference failed" not in out


def test_unique_encodings_do_not_grow_diagnostics_or_logs(policy_path, peer, tmp_path):
    proc = start_node(params(policy_path), tmp_path)
    try:
        peer.instruction.publish(String(data="close the window"))
        assert peer.wait_for(lambda: peer.trajectories, 60, peer.good_inputs()), stop(proc)
        sent = 0
        end = time.monotonic() + 15
        while sent < 300 and time.monotonic() < end:
            # A new 1 KB encoding per message, each held until the node has had a chance to read it.
            peer.base.publish(Image(height=1, width=1, encoding=f"{sent:04d}" + "e" * 1020, step=3, data=b"abc"))
            peer.wrist.publish(jpeg())
            peer.joints.publish(joints())
            peer.spin(0.05)
            sent += 1
        assert peer.wait_for(lambda: peer.last_values().get("bad_messages", "").startswith("encoding: "), 5)
        assert int(peer.last_values()["bad_messages"].split(": ")[1]) > 10  # the node read many of them
        for status in statuses(peer):
            assert sum(len(kv.key) + len(kv.value) for kv in status.values) + len(status.message) < 2000
    finally:
        out = stop(proc)
    assert out.count("Dropping camera:base_0_rgb message: image encoding") == 1


def test_a_huge_instruction_is_cut_once_and_reported(policy_path, peer, tmp_path):
    proc = start_node(params(policy_path, max_instruction_length=300), tmp_path)
    try:
        peer.instruction.publish(String(data="pick up the red cup " * 50_000))  # 1 MB
        assert peer.wait_for(lambda: len(peer.trajectories) >= 3, 60, peer.good_inputs()), stop(proc)
        assert peer.wait_for(lambda: peer.last_values().get("instructions_cut") == "1", 5, peer.good_inputs())
    finally:
        out = stop(proc)
    assert out.count("An instruction of 1000000 characters was cut to max_instruction_length=300") == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_during_an_inference_is_clean(slow_policy_path, peer, tmp_path, sig):
    proc = start_node(params(slow_policy_path, max_input_age=10.0), tmp_path)
    try:
        peer.instruction.publish(String(data="reach the target"))
        # With inferences of about a second back to back, the worker is nearly always busy.
        assert peer.wait_for(lambda: len(peer.trajectories) >= 2, 90, peer.good_inputs()), stop(proc)
        peer.spin(0.5, peer.good_inputs())
    finally:
        out = stop(proc, sig)
    assert proc.returncode == 0, out
    assert "ERROR" not in out and "Traceback" not in out, out
