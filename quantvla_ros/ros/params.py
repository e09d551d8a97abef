"""Declaring a node's parameters from one table of defaults (or types, for required ones)."""

from __future__ import annotations

from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node

from quantvla_ros.errors import QuantVLAError


def declare(node: Node, spec: dict[str, object]) -> dict:
    """Declare each parameter with its default, or with just its type when it has none; return the values."""
    for name, default in spec.items():
        node.declare_parameter(name, default)
    return read(node, spec)


def read(node: Node, spec: dict[str, object]) -> dict:
    """The current values of the parameters in `spec`; a typed one that nobody set comes back as None."""
    values = {}
    for name in spec:
        try:
            values[name] = node.get_parameter(name).value
        except ParameterUninitializedException:
            values[name] = None
    return values


def require(values: dict, names: list[str], where: str) -> None:
    missing = [n for n in names if not values.get(n)]
    if missing:
        raise QuantVLAError(f"Parameter(s) {', '.join(missing)} must be set (see {where}).")
