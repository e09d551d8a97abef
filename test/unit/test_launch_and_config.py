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


def test_policy_launch_starts_a_lifecycle_node_with_autostart_and_namespace():
    tree = ast.parse((ROOT / "launch" / "policy.launch.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    nodes = [c for c in calls if getattr(c.func, "id", "") == "LifecycleNode"]
    assert nodes and not [c for c in calls if getattr(c.func, "id", "") == "Node"]
    # launch_ros requires a lifecycle node's namespace; `common` carries it with the name.
    common = next(c for c in calls if getattr(c.func, "id", "") == "dict")
    assert {"name", "namespace", "executable"} <= {kw.arg for kw in common.keywords}
    declared = {c.args[0].value for c in calls if getattr(c.func, "id", "") == "DeclareLaunchArgument"}
    assert {"autostart", "namespace"} <= declared and "autostart" in PARAMETERS


@pytest.mark.parametrize("name", ["policy.yaml", "sim_policy.yaml"])
def test_policy_configs_set_only_parameters_the_node_declares(name):
    params = yaml.safe_load((ROOT / "config" / name).read_text())["/**"]["ros__parameters"]
    assert set(params) - {"use_sim_time"} <= set(PARAMETERS)
    assert len(params["camera_names"]) == len(params["camera_topics"]) == len(params["camera_types"])
