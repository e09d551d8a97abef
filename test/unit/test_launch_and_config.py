"""Launch files and configs agree with the package: executables exist, parameters are the node's own.

The `launch` package is not on PyPI, so launch files are checked statically here; the nodes
themselves are started the way launch starts them in the integration tests.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from quantvla_ros.ros.policy_node import PARAMETERS

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))


def console_scripts() -> set[str]:
    return set(re.findall(r'"(\w+) = quantvla_ros\.[\w.]+:main"', (ROOT / "setup.py").read_text()))


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=[p.name for p in LAUNCH_FILES])
def test_launch_file_compiles_and_starts_installed_executables(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    executables = {
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "executable" and isinstance(kw.value, ast.Constant)
    }
    assert executables and executables <= console_scripts()
    for name in re.findall(r'"(\w+\.yaml)"', path.read_text()):
        assert (ROOT / "config" / name).is_file(), name
    declared = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument"
    }
    assert {"params_file", "use_sim_time"} <= declared


def test_policy_config_sets_only_parameters_the_node_declares():
    params = yaml.safe_load((ROOT / "config" / "policy.yaml").read_text())["/**"]["ros__parameters"]
    assert set(params) <= set(PARAMETERS)
    assert len(params["camera_names"]) == len(params["camera_topics"]) == len(params["camera_types"])
