"""Where the package's configs and the shipped demo policy live: the source tree or the install.

From a checkout (`make`, pip -e) they sit at the repository root; after `colcon build` they are
installed under `share/quantvla_ros` and found through the ament index.
"""

from __future__ import annotations

from pathlib import Path

from quantvla_ros.errors import QuantVLAError

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def share_dir() -> Path:
    if (SOURCE_ROOT / "package.xml").exists():
        return SOURCE_ROOT
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        return Path(get_package_share_directory("quantvla_ros"))
    except PackageNotFoundError:
        raise QuantVLAError(
            "quantvla_ros's configs are neither beside its sources nor in an installed share folder; "
            "run from a checkout or source the colcon install."
        ) from None


def config_file(name: str) -> Path:
    return share_dir() / "config" / name


def demo_policy() -> Path:
    return share_dir() / "policies" / "demo_pi05"
