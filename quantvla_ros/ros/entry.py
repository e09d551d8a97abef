"""The `main` of every node: init, build, run, and turn a user error into one sentence and exit 2.

rclpy's own signal handlers shut the context down the moment SIGINT or SIGTERM arrives, while a
node's worker thread may still be publishing into it. Here both signals raise KeyboardInterrupt
in the main thread instead, so `finally` stops the node, and with it its workers, before the
context goes down.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

# The longest a signal waits to be noticed while the executor has nothing to do (Python runs
# signal handlers only between bytecodes, never inside the middleware's wait).
SIGNAL_POLL_S = 0.2


def run_node(name: str, make: Callable[[], Node], work: Callable[[Node], object] | None, args: list[str] | None) -> int:
    """Spin `make()` until a signal, or, with `work`, run it once and return (offline nodes)."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    node = None
    try:
        node = make()
        if work is None:
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            while rclpy.ok():
                executor.spin_once(timeout_sec=SIGNAL_POLL_S)
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
