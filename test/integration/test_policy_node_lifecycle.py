"""The policy node as a managed node: transitions requested over DDS, as a lifecycle manager would."""

from __future__ import annotations

import time

import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from lifecycle_msgs.msg import Transition
from node_fixtures import params, start_node, stop
from std_msgs.msg import String

pytestmark = pytest.mark.integration


def test_transitions_switch_actions_on_and_off(slow_policy_path, peer, tmp_path):
    proc = start_node(params(slow_policy_path, autostart=False, max_input_age=10.0), tmp_path)
    inputs = peer.good_inputs()
    try:
        peer.instruction.publish(String(data="open the top drawer"))
        assert peer.state(60) == "unconfigured", stop(proc)
        peer.spin(1.5, inputs)
        assert not peer.trajectories and peer.last_status() is None

        assert peer.change_state(Transition.TRANSITION_CONFIGURE)
        assert peer.state() == "inactive"
        assert peer.wait_for(lambda: peer.last_values().get("state") == "inactive", 10, inputs)
        assert peer.last_status().level == DiagnosticStatus.OK
        peer.spin(2.0, inputs)
        assert not peer.trajectories

        assert peer.change_state(Transition.TRANSITION_ACTIVATE)
        assert peer.wait_for(lambda: len(peer.trajectories) >= 2, 60, inputs), stop(proc)
        # Inferences of about a second run back to back: one is in flight when deactivation is asked.
        peer.spin(0.3, inputs)
        assert peer.change_state(Transition.TRANSITION_DEACTIVATE)
        answered = time.time_ns()
        count = len(peer.trajectories)
        peer.spin(3.0, inputs)
        assert all(published < answered for published, _ in peer.timestamps), "a chunk left after deactivation"
        assert len(peer.trajectories) == count
        assert peer.wait_for(lambda: peer.last_values().get("state") == "inactive", 5, inputs)

        assert peer.change_state(Transition.TRANSITION_ACTIVATE)
        assert peer.wait_for(lambda: len(peer.trajectories) > count, 60, inputs)
        assert peer.change_state(Transition.TRANSITION_DEACTIVATE)
        assert peer.change_state(Transition.TRANSITION_CLEANUP)
        assert peer.state() == "unconfigured"
        diagnostics = len(peer.diagnostics)
        peer.spin(2.5, inputs)
        assert len(peer.diagnostics) == diagnostics  # the model and everything built with it are gone

        assert peer.change_state(Transition.TRANSITION_CONFIGURE)
        assert peer.change_state(Transition.TRANSITION_ACTIVATE)
        count = len(peer.trajectories)
        assert peer.wait_for(lambda: len(peer.trajectories) > count, 60, inputs)
        assert peer.change_state(Transition.TRANSITION_ACTIVE_SHUTDOWN)
        assert peer.state() == "finalized"
        assert proc.poll() is None
    finally:
        out = stop(proc)
    assert proc.returncode == 0 and "ERROR" not in out and "Traceback" not in out, out


def test_a_failed_configure_is_one_sentence_and_can_be_retried(policy_path, peer, tmp_path):
    proc = start_node(params(tmp_path / "no_policy_here", autostart=False), tmp_path)
    try:
        assert peer.state(60) == "unconfigured", stop(proc)
        assert not peer.change_state(Transition.TRANSITION_CONFIGURE)
        assert peer.state() == "unconfigured" and proc.poll() is None
        # The operator fixes the folder (here: puts the policy where the parameter points) and retries.
        (tmp_path / "no_policy_here").symlink_to(policy_path, target_is_directory=True)
        assert peer.change_state(Transition.TRANSITION_CONFIGURE)
        assert peer.change_state(Transition.TRANSITION_ACTIVATE)
        peer.instruction.publish(String(data="reach the target"))
        assert peer.wait_for(lambda: peer.trajectories, 60, peer.good_inputs())
    finally:
        out = stop(proc)
    failures = [line for line in out.splitlines() if "Configuration failed" in line]
    assert len(failures) == 1 and "no_policy_here does not exist" in failures[0], out
    assert "Traceback" not in out
