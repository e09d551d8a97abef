"""Scripted-expert demonstrations written as rosbag2 (mcap) bags, one bag per task.

Each bag holds the topics the sim node publishes, so it is both the demo policy's training data
and the realistic input of the calibration node:

    /clock               rosgraph_msgs/msg/Clock            every control step
    /instruction         std_msgs/msg/String                once, at the start of each episode
    /camera/image_raw    sensor_msgs/msg/Image (rgb8)       every control step
    /joint_states        sensor_msgs/msg/JointState         every control step (name = STATE_NAMES)
    /action              trajectory_msgs/msg/JointTrajectory the expert's action at that step, one
                                                            point at time_from_start = dt
                                                            (joint_names = ACTION_NAMES)

Time is sim time: control step k of an episode is stamped t0 + k·dt with dt = 0.0125 s
(MetaWorld's 0.0025 s timestep × frame_skip 5); the image, state and action of one step share
one stamp. An episode starts with its /instruction message and the next one starts a second
after it ends, so episodes are recoverable from either. Only successful episodes are kept.

    python -m quantvla_ros.sim.demos --out build/demos --episodes 40 --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from quantvla_ros.atomic import atomic_dir
from quantvla_ros.outputs import OutputKind, check_output_folder
from quantvla_ros.progress import Progress as tqdm
from quantvla_ros.sim.env import SimEnv
from quantvla_ros.sim.tasks import ACTION_NAMES, DEFAULT_TASKS, INSTRUCTIONS, STATE_NAMES

TOPICS = {
    "/clock": "rosgraph_msgs/msg/Clock",
    "/instruction": "std_msgs/msg/String",
    "/camera/image_raw": "sensor_msgs/msg/Image",
    "/joint_states": "sensor_msgs/msg/JointState",
    "/action": "trajectory_msgs/msg/JointTrajectory",
}
EPISODE_GAP_NS = 1_000_000_000
TYPESTORE = get_typestore(Stores.ROS2_JAZZY)
T = TYPESTORE.types


def _time(ns: int):
    return T["builtin_interfaces/msg/Time"](sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _header(ns: int, frame: str):
    return T["std_msgs/msg/Header"](stamp=_time(ns), frame_id=frame)


def _messages(ns: int, image: np.ndarray, state: np.ndarray, action: np.ndarray, dt_ns: int) -> dict:
    """The per-step messages of one control step, all stamped `ns`."""
    height, width, _ = image.shape
    empty = np.zeros(0, np.float64)
    point = T["trajectory_msgs/msg/JointTrajectoryPoint"](
        positions=action.astype(np.float64),
        velocities=empty,
        accelerations=empty,
        effort=empty,
        time_from_start=T["builtin_interfaces/msg/Duration"](sec=dt_ns // 1_000_000_000, nanosec=dt_ns % 1_000_000_000),
    )
    return {
        "/clock": T["rosgraph_msgs/msg/Clock"](clock=_time(ns)),
        "/camera/image_raw": T["sensor_msgs/msg/Image"](
            header=_header(ns, "camera"),
            height=height,
            width=width,
            encoding="rgb8",
            is_bigendian=0,
            step=3 * width,
            data=np.ascontiguousarray(image, dtype=np.uint8).reshape(-1),
        ),
        "/joint_states": T["sensor_msgs/msg/JointState"](
            header=_header(ns, "base"),
            name=list(STATE_NAMES),
            position=state.astype(np.float64),
            velocity=empty,
            effort=empty,
        ),
        "/action": T["trajectory_msgs/msg/JointTrajectory"](
            header=_header(ns, "base"), joint_names=list(ACTION_NAMES), points=[point]
        ),
    }


BAG_OUTPUT = OutputKind("a rosbag2 bag", lambda p: (p / "metadata.yaml").is_file())
# Stale `.task.*` scratch folders of an interrupted recording may sit beside the bags.
BAGS_OUTPUT = OutputKind(
    "a folder of rosbag2 bags", lambda p: all(e.name.startswith(".") or BAG_OUTPUT.recognise(e) for e in p.iterdir())
)


def check_demo_targets(out: Path, tasks: list[str], overwrite: bool) -> None:
    """Refuse, before anything is recorded, an `out` that is not a folder of bags or an existing bag
    of a task without `overwrite`. Bags are added to `out`; nothing else in it is touched."""
    check_output_folder(out, "--out", BAGS_OUTPUT, overwrite=True)
    for task in tasks:
        check_output_folder(Path(out) / task, "Bag", BAG_OUTPUT, overwrite)


def record_task(
    out: Path,
    task: str,
    episodes: int,
    seed: int,
    width: int = 112,
    height: int = 112,
    camera: str = "scene",
    overwrite: bool = False,
) -> dict:
    """Write `episodes` successful expert episodes of `task` to the mcap bag `out/task`.

    Episode seeds are seed, seed+1, ...; a seed whose expert fails is skipped (and counted).
    The bag is written beside its target and renamed into place, so it is never half there; an
    earlier bag of the task is replaced only with `overwrite`.
    """
    check_demo_targets(out, [task], overwrite)
    target = Path(out) / task
    lengths, failed, next_seed, ns = [], 0, seed, 0
    with (
        atomic_dir(target) as tmp,
        SimEnv(task, width=width, height=height, camera=camera) as env,
        Writer(tmp, version=9, storage_plugin=StoragePlugin.MCAP) as writer,
    ):
        conns = {topic: writer.add_connection(topic, kind, typestore=TYPESTORE) for topic, kind in TOPICS.items()}
        dt_ns = round(env.dt * 1e9)
        bar = tqdm(total=episodes, desc=task, unit="ep", leave=False)
        while len(lengths) < episodes:
            steps, success = _run_expert(env, next_seed)
            next_seed += 1
            if not success:
                failed += 1
                continue
            _write(writer, conns, TYPESTORE.types["std_msgs/msg/String"](data=INSTRUCTIONS[task]), "/instruction", ns)
            for image, state, action in steps:
                for topic, msg in _messages(ns, image, state, action, dt_ns).items():
                    _write(writer, conns, msg, topic, ns)
                ns += dt_ns
            ns += EPISODE_GAP_NS
            lengths.append(len(steps))
            bar.update()
        bar.close()
    return {"task": task, "bag": str(target), "episodes": len(lengths), "steps": sum(lengths), "failed_seeds": failed}


def _run_expert(env: SimEnv, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], bool]:
    obs = env.reset(seed)
    steps, done, success = [], False, False
    while not done:
        action = env.expert_action()
        steps.append((obs.image, obs.state, action))
        obs, success, done = env.step(action)
    return steps, success


def _write(writer: Writer, conns: dict, msg, topic: str, ns: int) -> None:
    writer.write(conns[topic], ns, TYPESTORE.serialize_cdr(msg, TOPICS[topic]))


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description="Record scripted MetaWorld expert demos as rosbag2 (mcap) bags."
    )
    parser.add_argument("--out", type=Path, required=True, help="folder that receives one bag per task")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(INSTRUCTIONS))
    parser.add_argument("--episodes", type=int, default=40, help="successful episodes per task")
    parser.add_argument("--seed", type=int, default=0, help="first episode seed (evaluation uses 1000+)")
    parser.add_argument("--width", type=int, default=112)
    parser.add_argument("--height", type=int, default=112)
    parser.add_argument("--camera", default="scene", help="'scene' (free camera) or a MetaWorld camera name")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier bags of the same tasks in --out")
    args = parser.parse_args(argv)
    check_demo_targets(args.out, args.tasks, args.overwrite)
    for task in tqdm(args.tasks, desc="tasks", unit="task"):
        info = record_task(
            args.out, task, args.episodes, args.seed, args.width, args.height, args.camera, args.overwrite
        )
        skipped = info["failed_seeds"]
        tqdm.write(f"{info['bag']}: {info['episodes']} episodes, {info['steps']} steps, {skipped} failed seeds skipped")


if __name__ == "__main__":
    main()
