"""The package as colcon and `ros2 run` see it: manifest, install layout, entry points, lint."""

from __future__ import annotations

import configparser
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_package_xml_is_format_3_ament_python_with_the_runtime_dependencies():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == "quantvla_ros"
    assert root.findtext("export/build_type") == "ament_python"
    assert root.findtext("buildtool_depend") == "ament_python"
    exec_depends = {e.text for e in root.findall("exec_depend")}
    messages = {"sensor_msgs", "std_msgs", "trajectory_msgs", "diagnostic_msgs", "lifecycle_msgs"}
    assert {"rclpy", "launch_ros", *messages} <= exec_depends


def test_scripts_install_where_ros2_run_looks_and_the_marker_exists():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["develop"]["script_dir"] == "$base/lib/quantvla_ros"
    assert cfg["install"]["install_scripts"] == "$base/lib/quantvla_ros"
    assert (ROOT / "resource" / "quantvla_ros").is_file()


def test_every_console_script_resolves_to_a_callable():
    scripts = [ep for ep in entry_points(group="console_scripts") if ep.value.startswith("quantvla_ros.")]
    assert "quantvla" in {ep.name for ep in scripts}
    for ep in scripts:
        assert callable(ep.load()), ep.name


def test_sources_pass_ruff():
    ruff = str(Path(sys.executable).parent / "ruff")
    check = subprocess.run([ruff, "check", "--output-format", "concise", str(ROOT)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    fmt = subprocess.run([ruff, "format", "--check", str(ROOT)], capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout
