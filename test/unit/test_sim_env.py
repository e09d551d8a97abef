"""The MetaWorld wrapper: names, shapes, determinism per seed, expert success."""

import numpy as np
import pytest

from quantvla_ros.sim.env import SimEnv
from quantvla_ros.sim.tasks import ACTION_NAMES, CONTROL_DT, DEFAULT_TASKS, INSTRUCTIONS, STATE_NAMES

pytestmark = pytest.mark.unit


def test_names_and_tasks():
    assert len(STATE_NAMES) == 10 and len(set(STATE_NAMES)) == 10
    assert STATE_NAMES[:4] == ("hand_x", "hand_y", "hand_z", "gripper_opening")
    assert ACTION_NAMES == ("ee_dx", "ee_dy", "ee_dz", "gripper_effort")
    assert len(DEFAULT_TASKS) >= 6 and set(DEFAULT_TASKS) <= set(INSTRUCTIONS)
    assert len(set(INSTRUCTIONS.values())) == len(INSTRUCTIONS)


def test_shapes_and_step():
    with SimEnv("drawer-close", width=40, height=32) as env:
        assert env.dt == pytest.approx(CONTROL_DT)
        assert env.state_names == STATE_NAMES and env.action_names == ACTION_NAMES
        obs = env.reset(0)
        assert obs.image.shape == (32, 40, 3) and obs.image.dtype == np.uint8
        assert obs.image.std() > 10  # a rendered scene, not a blank frame
        assert obs.state.shape == (10,) and obs.state.dtype == np.float32
        assert obs.instruction == INSTRUCTIONS["drawer-close"]
        obs2, success, done = env.step(np.array([1.0, 0.0, 0.0, 0.0]))
        assert obs2.state[0] > obs.state[0]  # +dx moves the hand along x
        assert not success and not done and env.steps == 1
        with pytest.raises(ValueError, match="MetaWorld takes 4"):
            env.step(np.zeros(3))


def test_deterministic_per_seed():
    with SimEnv("push", width=32, height=32) as env:
        a = env.reset(7)
        a_next = env.step(env.expert_action())[0]
        b = env.reset(7)
        b_next = env.step(env.expert_action())[0]
        c = env.reset(8)
    np.testing.assert_array_equal(a.state, b.state)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a_next.state, b_next.state)
    assert not np.allclose(a.state[4:], c.state[4:])  # another seed places object and goal elsewhere


def test_expert_solves_reach_and_errors_are_clear():
    with SimEnv("reach", render=False) as env:
        obs = env.reset(0)
        assert obs.image is None
        done = False
        while not done:
            _, success, done = env.step(env.expert_action())
        assert success and env.steps < 100
    with pytest.raises(ValueError, match="Unknown task"):
        SimEnv("fly-away")
    with pytest.raises(ValueError, match="Unknown camera"):
        SimEnv("reach", camera="nope")
