"""The shipped demo policy loads like any checkpoint and solves an easy task in closed loop."""

import json
from pathlib import Path

import pytest

from quantvla_ros.cli import main
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


def test_eval_sim_writes_results_only_into_a_results_folder(tmp_path, capsys):
    args = [
        "eval-sim",
        "--policy",
        str(DEMO_POLICY),
        "--tasks",
        "drawer-close",
        "--episodes",
        "1",
        "--execute-steps",
        "10",
    ]
    (tmp_path / "notes.md").write_text("mine")
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a non-empty folder that is not evaluation results" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.json").write_text("{}")
    assert main([*args, "--out", str(results)]) == 2
    assert "already holds evaluation results; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(results), "--overwrite"]) == 0
    result = json.loads((results / "results.json").read_text())
    assert result["episodes"] == 1 and result["policy_latency_p50_ms"] > 0 and result["via"] == "in-process"
    assert "Policy latency p50 (in-process)" in (results / "results.md").read_text()
