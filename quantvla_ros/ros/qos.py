"""QoS profiles named by strings, so launch files and YAML can set them (as Isaac ROS does)."""

from __future__ import annotations

from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
    qos_profile_system_default,
)

# A RELIABLE subscriber receives nothing from a BEST_EFFORT camera, so cameras default to
# SENSOR_DATA; instructions are latched (TRANSIENT_LOCAL) so a late-starting node still gets one.
PROFILES = {
    "SENSOR_DATA": lambda depth: QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=qos_profile_sensor_data.reliability,
        durability=qos_profile_sensor_data.durability,
    ),
    "RELIABLE": lambda depth: QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE
    ),
    "BEST_EFFORT": lambda depth: QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.BEST_EFFORT
    ),
    "RELIABLE_TRANSIENT_LOCAL": lambda depth: QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    ),
    "SYSTEM_DEFAULT": lambda depth: QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=qos_profile_system_default.reliability,
        durability=qos_profile_system_default.durability,
    ),
}


def qos_from_string(name: str, depth: int = 1) -> QoSProfile:
    key = name.strip().upper()
    if key not in PROFILES:
        raise ValueError(f"QoS {name!r} is not known; use one of {', '.join(PROFILES)}.")
    return PROFILES[key](depth)
