"""The `main` of every node: init, build, run, and turn a user error into one sentence and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node


def run_node(name: str, make: Callable[[], Node], work: Callable[[Node], object] | None, args: list[str] | None) -> int:
    """Spin `make()` until shutdown, or, with `work`, run it once and return (offline nodes)."""
    rclpy.init(args=args)
    node = None
    try:
        node = make()
        if work is None:
            rclpy.spin(node)
        else:
            work(node)
    except (ValueError, FileNotFoundError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0 if work is None else 130
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0
