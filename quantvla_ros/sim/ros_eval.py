"""Closed-loop evaluation through the real ROS loop: sim node <-> policy node over DDS.

The policy node runs as its own process, started the way launch starts it (entry point +
params files), and the simulator node runs here; they talk only through topics. Results come
from the simulator's episode reports, and the policy node's latency from its /diagnostics.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray

from quantvla_ros.sim.evaluate import summarize
from quantvla_ros.sim.sim_node import SimNode


def _params_file(folder: Path, name: str, params: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    return path


def evaluate_over_ros(
    policy_path: Path,
    policy_params: Path,
    tasks: list[str],
    episodes: int,
    seed: int,
    execute_steps: int = 5,
    max_steps: int = 200,
) -> dict:
    """Run `episodes` per task with the policy node serving `policy_path`; per-task success and lengths."""
    with tempfile.TemporaryDirectory(prefix="quantvla_eval_") as tmp:
        tmp = Path(tmp)
        override = _params_file(tmp, "policy", {"policy_path": str(policy_path)})
        exe = Path(sys.executable).parent / "policy_node"
        cmd = [str(exe), "--ros-args", "--params-file", str(policy_params), "--params-file", str(override)]
        node_log = tmp / "policy_node.log"
        with open(node_log, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        # The sim node would wait forever for a policy node that died (a bad path, a wrong
        # checkpoint): stopping ROS ends its wait, and the node's log becomes the error.
        threading.Thread(target=_shutdown_if_failed, args=(proc,), daemon=True).start()
        sim_params = _params_file(
            tmp,
            "sim",
            {
                "tasks": list(tasks),
                "episodes": episodes,
                "seed": seed,
                "execute_steps": execute_steps,
                "max_steps": max_steps,
                "controller": "policy",
            },
        )
        rclpy.init(args=["--ros-args", "--params-file", str(sim_params)])
        latencies: list[str] = []
        try:
            sim = SimNode()
            sim.create_subscription(
                DiagnosticArray,
                "/diagnostics",
                lambda msg: latencies.extend(
                    kv.value for s in msg.status for kv in s.values if kv.key == "latency_p50_ms"
                ),
                10,
            )
            results = sim.run()
            sim.destroy_node()
        finally:
            rclpy.try_shutdown()
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if proc.returncode not in (0, -15) and not results:
            raise ChildProcessError(
                f"The policy node exited with code {proc.returncode}; its log ends:\n{node_log.read_text()[-2000:]}"
            )
    outcomes = {task: [(r["success"], r["steps"]) for r in results if r["task"] == task] for task in tasks}
    measured = [float(v) for v in latencies if v != "n/a"]
    return {
        **summarize(outcomes, episodes, seed, execute_steps, max_steps),
        "policy_latency_p50_ms": measured[-1] if measured else None,
        "via": "ros",
    }


def _shutdown_if_failed(proc: subprocess.Popen) -> None:
    if proc.wait() not in (0, -15):
        rclpy.try_shutdown()
