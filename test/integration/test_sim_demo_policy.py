"""The shipped demo policy loads like any checkpoint and solves an easy task in closed loop."""

from pathlib import Path

import pytest

from quantvla_ros.loader import load_policy
from quantvla_ros.sim.evaluate import evaluate
from quantvla_ros.sim.tasks import ACTION_NAMES, STATE_NAMES

pytestmark = pytest.mark.integration

DEMO_POLICY = Path(__file__).resolve().parents[2] / "policies" / "demo_pi05"


def test_shipped_policy_loads_and_succeeds():
    size = sum(f.stat().st_size for f in DEMO_POLICY.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    policy = load_policy(DEMO_POLICY)
    assert policy.state_dim == len(STATE_NAMES) and policy.action_dim == len(ACTION_NAMES)
    result = evaluate(policy, ["drawer-close"], episodes=3, seed=1000)
    assert sum(result["tasks"]["drawer-close"]["successes"]) >= 1
