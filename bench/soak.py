"""Soak: the policy node on the demo policy under 30 Hz cameras for an hour; does it drift?

    OMP_NUM_THREADS=1 python bench/soak.py [--duration 3600] [--window 600] [--csv soak.csv]

Starts the policy node as launch does (entry point + params file) with `config/sim_policy.yaml`
(the demo policy `policies/demo_pi05` and the simulator's topics and joints) on wall time,
and plays the robot: a 112×112 rgb8 camera and the joint state at `--rate` Hz, stamped with the
time they are sent, and one latched instruction. Every `--sample` seconds it records the node's
resident memory (/proc), the actions published since the last sample, and the latency of each
chunk from its camera frame being sent to its arrival here (the node stamps a chunk with its
frame's stamp). At the end it prints the first and the last `--window` seconds side by side
and their ratio: a leak shows as a memory ratio above 1, a slowdown as a latency ratio above 1.

DDS stays on loopback in a domain of its own (`--domain-id`), so a soak never hears, or is
heard by, tests or a demo on the same machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rclpy
import yaml
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from quantvla_ros.atomic import write_bytes_atomic
from quantvla_ros.data.mapping import read_params_file
from quantvla_ros.paths import config_file, demo_policy
from quantvla_ros.ros.policy_node import PARAMETERS
from quantvla_ros.ros.qos import qos_from_string
from quantvla_ros.sim.tasks import INSTRUCTIONS


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def summary(rows: list[dict], start: float, end: float) -> dict:
    picked = [r for r in rows if start <= r["t"] < end]
    latencies = np.concatenate([r["latencies_ms"] for r in picked]) if picked else np.zeros(0)
    span = sum(r["interval"] for r in picked)
    return {
        "rss_mib": float(np.median([r["rss_mib"] for r in picked])),
        "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
        "latency_p95_ms": float(np.percentile(latencies, 95)) if latencies.size else float("nan"),
        "actions_per_s": sum(r["published"] for r in picked) / span if span else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds (default: 1 h)")
    parser.add_argument("--window", type=float, default=600.0, help="seconds compared at the start and the end")
    parser.add_argument("--rate", type=float, default=30.0, help="camera and joint-state rate, Hz")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--domain-id", type=int, default=73)
    parser.add_argument("--csv", type=Path, help="write every sample here")
    args = parser.parse_args()
    if args.duration < 2 * args.window:
        parser.error(f"--duration {args.duration} must be at least twice --window {args.window}.")
    # Read by rclpy.init and by the node it starts: loopback only, in a domain no test or demo uses.
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = str(args.domain_id)
    defaults = {k: v for k, v in PARAMETERS.items() if not isinstance(v, Parameter.Type)}
    params = {**defaults, **read_params_file(config_file("sim_policy.yaml"), "policy_node")}
    # No simulator here to drive /clock: the node ages inputs on wall time, as on a robot.
    params.update(policy_path=str(demo_policy()), use_sim_time=False)
    work = Path(tempfile.mkdtemp(prefix="soak_"))
    (work / "params.yaml").write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    rclpy.init()
    peer = rclpy.create_node("soak_peer")
    camera = peer.create_publisher(Image, params["camera_topics"][0], qos_from_string(params["image_qos"]))
    joints = peer.create_publisher(
        JointState, params["joint_states_topic"], qos_from_string(params["joint_states_qos"])
    )
    instruction = peer.create_publisher(String, params["instruction_topic"], qos_from_string(params["instruction_qos"]))
    instruction.publish(String(data=INSTRUCTIONS["reach"]))
    latencies: list[float] = []

    def on_chunk(msg: JointTrajectory) -> None:
        latencies.append(time.time() - (msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9))

    peer.create_subscription(JointTrajectory, params["action_topic"], on_chunk, 10)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8).tobytes() for _ in range(8)]
    names = list(params["state_joints"])
    rows: list[dict] = []
    log = open(work / "policy_node.log", "w")
    node_exe = Path(sys.executable).parent / "policy_node"
    proc = subprocess.Popen(
        [str(node_exe), "--ros-args", "--params-file", str(work / "params.yaml")], stdout=log, stderr=log
    )
    try:
        started = time.monotonic()
        deadline = started + 120  # the node loads and warms up the policy first
        while not latencies and time.monotonic() < deadline:
            publish_inputs(camera, joints, frames, names, 0)
            rclpy.spin_once(peer, timeout_sec=1.0 / args.rate)
        if not latencies:
            raise SystemExit(f"The policy node published no action in 2 minutes; its log: {work / 'policy_node.log'}")
        latencies.clear()
        start = time.monotonic()
        next_frame, next_sample, k = start, start + args.sample, 0
        last_sample = start
        while (now := time.monotonic()) < start + args.duration:
            if proc.poll() is not None:
                raise SystemExit(f"The policy node exited with code {proc.returncode}; see {work / 'policy_node.log'}")
            if now >= next_frame:
                k += 1
                publish_inputs(camera, joints, frames, names, k)
                next_frame += 1.0 / args.rate
            if now >= next_sample:
                got = np.array(latencies) * 1e3
                latencies.clear()
                rows.append(
                    {
                        "t": now - start,
                        "interval": now - last_sample,
                        "rss_mib": resident_mib(proc.pid),
                        "published": got.size,
                        "latencies_ms": got,
                    }
                )
                last_sample, next_sample = now, next_sample + args.sample
            rclpy.spin_once(peer, timeout_sec=max(0.0, min(next_frame, next_sample) - time.monotonic()))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        peer.destroy_node()
        rclpy.shutdown()
    first = summary(rows, 0, args.window)
    last = summary(rows, args.duration - args.window, args.duration)
    print(
        f"policy node, {params['policy_path']} on {params['device']}, camera {args.rate:g} Hz, "
        f"{args.duration / 60:g} min, first vs last {args.window / 60:g} min"
    )
    print(f"  {'':<22}{'first':>10}{'last':>10}{'ratio':>8}")
    for key, label in [
        ("rss_mib", "resident memory MiB"),
        ("latency_p50_ms", "latency p50 ms"),
        ("latency_p95_ms", "latency p95 ms"),
        ("actions_per_s", "chunks per second"),
    ]:
        print(f"  {label:<22}{first[key]:>10.1f}{last[key]:>10.1f}{last[key] / first[key]:>8.3f}")
    if args.csv:
        lines = ["t_s,rss_mib,chunks,latency_p50_ms"] + [
            f"{r['t']:.1f},{r['rss_mib']:.1f},{r['published']},"
            f"{np.percentile(r['latencies_ms'], 50) if r['published'] else float('nan'):.2f}"
            for r in rows
        ]
        write_bytes_atomic(args.csv, ("\n".join(lines) + "\n").encode())


def publish_inputs(camera, joints, frames: list[bytes], names: list[str], k: int) -> None:
    """One camera frame and one joint state, stamped now (wall time: the node runs without sim time)."""
    stamp = time.time()
    msg = Image(height=112, width=112, encoding="rgb8", step=336, data=frames[k % len(frames)])
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp), int((stamp % 1) * 1e9)
    camera.publish(msg)
    joints.publish(JointState(name=names, position=[0.1 * np.sin(0.01 * k + i) for i in range(len(names))]))


if __name__ == "__main__":
    main()
