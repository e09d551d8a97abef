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
    "SENSOR_DATA": (qos_profile_sensor_data.reliability, qos_profile_sensor_data.durability),
    "RELIABLE": (ReliabilityPolicy.RELIABLE, DurabilityPolicy.VOLATILE),
    "BEST_EFFORT": (ReliabilityPolicy.BEST_EFFORT, DurabilityPolicy.VOLATILE),
    "RELIABLE_TRANSIENT_LOCAL": (ReliabilityPolicy.RELIABLE, DurabilityPolicy.TRANSIENT_LOCAL),
    "SYSTEM_DEFAULT": (qos_profile_system_default.reliability, qos_profile_system_default.durability),
}


def qos_from_string(name: str, depth: int = 1) -> QoSProfile:
    key = name.strip().upper()
    if key not in PROFILES:
        raise ValueError(f"QoS {name!r} is not known; use one of {', '.join(PROFILES)}.")
    reliability, durability = PROFILES[key]
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability, durability=durability)
