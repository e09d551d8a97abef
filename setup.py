"""ament_python build for colcon, and a plain pip install for machines without ROS."""

import os
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "quantvla_ros"


def tree(folder: str) -> list[tuple[str, list[str]]]:
    """data_files entries installing `folder` (with subfolders) under share/quantvla_ros."""
    return [
        (os.path.join("share", PACKAGE, root), [os.path.join(root, f) for f in files])
        for root, _, files in os.walk(folder)
        if files
    ]


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "kernels", "bench", "scripts"]) + ["quantvla_kernels"],
    package_dir={"quantvla_kernels": "kernels"},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (os.path.join("share", PACKAGE, "launch"), glob("launch/*.launch.py")),
        (os.path.join("share", PACKAGE, "config"), glob("config/*.yaml")),
        *tree("policies"),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="quantvla_ros maintainers",
    maintainer_email="maintainers@quantvla-ros.dev",
    description="QuantVLA post-training quantization of VLA policies, served as ROS 2 nodes.",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "quantvla = quantvla_ros.cli:main",
            "policy_node = quantvla_ros.ros.policy_node:main",
            "calibration_node = quantvla_ros.ros.calibration_node:main",
            "sim_node = quantvla_ros.sim.sim_node:main",
        ],
    },
)
