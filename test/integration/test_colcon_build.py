"""`colcon build` installs the package the way `ros2 run` and launch find it on a robot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "install", "log", "__pycache__", "*.egg-info")


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(ROOT, ws / "src" / "quantvla_ros", ignore=SKIP)
    colcon = Path(sys.executable).parent / "colcon"
    done = subprocess.run(
        [str(colcon), "build", "--base-paths", "src", "--event-handlers", "console_direct-"],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return ws / "install" / "quantvla_ros"


def test_install_tree_has_the_ament_layout(install):
    assert (install / "share" / "ament_index" / "resource_index" / "packages" / "quantvla_ros").is_file()
    assert (install / "share" / "quantvla_ros" / "package.xml").is_file()
    script = install / "lib" / "quantvla_ros" / "quantvla"
    assert script.is_file() and os.access(script, os.X_OK)
    site = next((install / "lib").glob("python3*/site-packages"))
    # Every family folder is a subpackage the install carries.
    for family in ("common", "pi0", "groot", "smolvla"):
        assert (site / "quantvla_ros" / "models" / family / "__init__.py").is_file(), family
    assert (site / "quantvla_kernels" / "reference.py").is_file()


def test_installed_command_runs_from_the_install_tree(install):
    site = next((install / "lib").glob("python3*/site-packages"))
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import quantvla_ros, quantvla_kernels; print(quantvla_ros.__file__)"],
        env=env,
        cwd=install,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(site))
    out = subprocess.run(
        [str(install / "lib" / "quantvla_ros" / "quantvla"), "info", "pi05_full"],
        env=env,
        cwd=install,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["total_parameters"] == pytest.approx(3.35e9, rel=5e-3)
