"""Real bags written with `rosbags` become a calibration buffer and then an artifact."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from quantvla_ros.cli import main
from quantvla_ros.data.bags import BagError, read_observations
from quantvla_ros.data.buffer import load_buffer
from quantvla_ros.data.mapping import TopicMapping
from quantvla_ros.loader import load_policy

from conftest import STATE_DIM, observation

pytestmark = pytest.mark.integration
JOINTS = [f"joint{i}" for i in range(STATE_DIM)]
MAPPING = {
    "camera_names": ["base_0_rgb", "left_wrist_0_rgb"],
    "camera_topics": ["/cam/base/image_raw", "/cam/wrist/image_raw/compressed"],
    "camera_types": ["raw", "compressed"],
    "instruction_topic": "/instruction",
    "joint_states_topic": "/joint_states",
    "state_joints": JOINTS,
    "action_joints": [f"act{i}" for i in range(4)],
}
TYPES = {
    "/cam/base/image_raw": "sensor_msgs/msg/Image",
    "/cam/wrist/image_raw/compressed": "sensor_msgs/msg/CompressedImage",
    "/instruction": "std_msgs/msg/String",
    "/joint_states": "sensor_msgs/msg/JointState",
}


def messages(ts, episodes: list[str], steps: int = 12, period_ns: int = 100_000_000):
    """(topic, time_ns, message) for a few episodes: padded rgb8 frames, jpeg wrist frames, joint states."""
    Image, Compressed = ts.types["sensor_msgs/msg/Image"], ts.types["sensor_msgs/msg/CompressedImage"]
    String, JointState = ts.types["std_msgs/msg/String"], ts.types["sensor_msgs/msg/JointState"]
    Header, Time = ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"]
    rng = np.random.default_rng(0)
    t = 1_000_000_000
    for text in episodes:
        yield "/instruction", t, String(data=text)
        for _ in range(steps):
            t += period_ns
            ros1 = {"seq": 0} if "seq" in Header.__dataclass_fields__ else {}
            header = Header(**ros1, stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id="cam")
            width, height, step = 20, 16, 20 * 3 + 4  # rows padded by 4 bytes
            data = rng.integers(0, 256, height * step, dtype=np.uint8)
            yield (
                "/cam/base/image_raw",
                t,
                Image(header=header, height=height, width=width, encoding="rgb8", is_bigendian=0, step=step, data=data),
            )
            buf = io.BytesIO()
            PILImage.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
            yield (
                "/cam/wrist/image_raw/compressed",
                t + 5_000_000,
                Compressed(header=header, format="jpeg", data=np.frombuffer(buf.getvalue(), np.uint8)),
            )
            yield (
                "/joint_states",
                t + 7_000_000,
                JointState(
                    header=header,
                    name=list(reversed(JOINTS)),
                    position=rng.uniform(-1, 1, STATE_DIM),
                    velocity=np.zeros(0),
                    effort=np.zeros(0),
                ),
            )


def write_bag(path: Path, storage: str, episodes: list[str], skip_topic: str | None = None) -> Path:
    if storage == "ros1":
        ts = get_typestore(Stores.ROS1_NOETIC)
        with Writer1(path) as writer:
            conns = {t: writer.add_connection(t, m, typestore=ts) for t, m in TYPES.items() if t != skip_topic}
            for topic, t, msg in messages(ts, episodes):
                if topic in conns:
                    writer.write(conns[topic], t, ts.serialize_ros1(msg, TYPES[topic]))
        return path
    ts = get_typestore(Stores.ROS2_JAZZY)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {t: writer.add_connection(t, m, typestore=ts) for t, m in TYPES.items() if t != skip_topic}
        for topic, t, msg in messages(ts, episodes):
            if topic in conns:
                writer.write(conns[topic], t, ts.serialize_cdr(msg, TYPES[topic]))
    return path


@pytest.fixture(scope="module")
def bags(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("bags")
    return [
        write_bag(root / "run_mcap", "mcap", ["pick up the red cup", "open the top drawer"]),
        write_bag(root / "run_sqlite", "sqlite3", ["push the green button"]),
        write_bag(root / "run.bag", "ros1", ["close the window"]),
    ]


def test_bags_give_aligned_observations_spread_over_bags_and_episodes(bags):
    observations, sources = read_observations(bags, TopicMapping.from_params(MAPPING), samples=20)
    assert len(observations) == 20
    assert {o.instruction for o in observations} == {
        "pick up the red cup",
        "open the top drawer",
        "push the green button",
        "close the window",
    }
    assert [len(s["sample_times_ns"]) for s in sources] == [10, 5, 5]
    first = observations[0]
    assert first.images["base_0_rgb"].shape == (16, 20, 3) and first.images["left_wrist_0_rgb"].shape == (12, 16, 3)
    assert first.state.shape == (STATE_DIM,)
    assert all(s["bytes"] > 0 and len(s["sha256"]) == 64 for s in sources)


def test_padded_step_is_honoured(bags):
    observations, _ = read_observations(bags[:1], TopicMapping.from_params(MAPPING), samples=1)
    ts = get_typestore(Stores.ROS2_JAZZY)
    frames = [m for topic, _, m in messages(ts, ["x"]) if topic == "/cam/base/image_raw"]
    # The first frame has no wrist image or joint state before it yet; the second is the first sample.
    expected = frames[1].data.reshape(16, 64)[:, :60].reshape(16, 20, 3)
    np.testing.assert_array_equal(observations[0].images["base_0_rgb"], expected)


def params_files(tmp_path: Path, policy_path: Path, bags: list[Path], **calibration) -> list[Path]:
    policy_yaml = tmp_path / "policy.yaml"
    policy_yaml.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"policy_path": "unused", **MAPPING}}}))
    calib = {
        "policy_path": str(policy_path),
        "bags": [str(b) for b in bags],
        "buffer": str(tmp_path / "calib.safetensors"),
        "samples": 8,
        **calibration,
    }
    calibration_yaml = tmp_path / "calibration.yaml"
    calibration_yaml.write_text(yaml.safe_dump({"/**": {"ros__parameters": calib}}))
    return [policy_yaml, calibration_yaml]


def test_cli_calibrate_builds_a_buffer_and_an_artifact(checkpoints, bags, tmp_path):
    policy_path = checkpoints[(True, "openpi")]
    files = params_files(tmp_path, policy_path, bags, artifact=str(tmp_path / "w4a8"), method="rtn")
    assert main(["calibrate", *[a for f in files for a in ("--params-file", str(f))]]) == 0
    buffer = load_buffer(tmp_path / "calib.safetensors")
    assert len(buffer) == 8 and [s["bag"] for s in buffer.manifest["sources"]] == ["run_mcap", "run_sqlite", "run.bag"]
    assert buffer.manifest["topics"]["cameras"]["/cam/base/image_raw"] == "base_0_rgb"
    policy = load_policy(tmp_path / "w4a8")
    assert policy.quant_config["calibration"]["samples"] == 8
    assert np.isfinite(policy.predict(observation()).actions).all()


def test_calibration_node_runs_like_launch_starts_it(checkpoints, bags, tmp_path):
    files = params_files(tmp_path, checkpoints[(True, "openpi")], bags[:2])
    exe = Path(sys.executable).parent / "calibration_node"
    cmd = [str(exe), "--ros-args", *[a for f in files for a in ("--params-file", str(f))]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    buffer = load_buffer(tmp_path / "calib.safetensors")
    manifest = buffer.manifest
    assert manifest["samples"] == len(buffer) == 8
    assert [s["bag"] for s in manifest["sources"]] == [b.name for b in bags[:2]]
    assert manifest["topics"]["cameras"]["/cam/base/image_raw"] == "base_0_rgb"
    # Prepared exactly as the policy node would prepare these observations for this checkpoint.
    buffer.check_matches(load_policy(checkpoints[(True, "openpi")]))


def test_corrupt_bag_is_named_and_leaves_nothing_behind(checkpoints, bags, tmp_path):
    broken = write_bag(tmp_path / "broken", "mcap", ["pick up the red cup"])
    mcap = next(broken.glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 3])
    files = params_files(tmp_path, checkpoints[(True, "openpi")], [bags[0], broken])
    exe = Path(sys.executable).parent / "calibration_node"
    done = subprocess.run(
        [str(exe), "--ros-args", *[a for f in files for a in ("--params-file", str(f))]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert f"Bag {broken}" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "calib.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".calib")]


def test_missing_or_mistyped_topic_and_empty_bag_are_named(tmp_path):
    mapping = TopicMapping.from_params(MAPPING)
    no_joints = write_bag(tmp_path / "no_joints", "sqlite3", ["x"], skip_topic="/joint_states")
    with pytest.raises(BagError, match=f"Bag {no_joints} has no topic /joint_states") as err:
        read_observations([no_joints], mapping, samples=4)
    assert "the bag's topics: /cam/base/image_raw (sensor_msgs/msg/Image)" in str(err.value)
    mistyped = TopicMapping.from_params({**MAPPING, "camera_types": ["compressed", "compressed"]})
    good = write_bag(tmp_path / "good", "mcap", ["x"])
    with pytest.raises(BagError, match="topic /cam/base/image_raw carries sensor_msgs/msg/Image, not"):
        read_observations([good], mistyped, samples=4)
    empty = write_bag(tmp_path / "empty", "mcap", [])
    with pytest.raises(BagError, match="No aligned observation in empty"):
        read_observations([empty], mapping, samples=4)
    with pytest.raises(BagError, match="does not exist"):
        read_observations([tmp_path / "nope"], mapping, samples=4)


def test_calibrate_never_writes_its_artifact_over_another_folder(checkpoints, bags, tmp_path, capsys):
    recorded = tmp_path / "recorded"
    shutil.copytree(bags[0], recorded)
    before = sorted(p.name for p in recorded.iterdir())
    files = params_files(tmp_path, checkpoints[(True, "openpi")], bags[:1], artifact=str(recorded), method="rtn")
    assert main(["calibrate", *[a for f in files for a in ("--params-file", str(f))]]) == 2
    err = capsys.readouterr().err
    assert f"Artifact folder {recorded} is a non-empty folder that is not a quantized artifact" in err
    assert sorted(p.name for p in recorded.iterdir()) == before
    assert not (tmp_path / "calib.safetensors").exists()  # refused before reading any bag


def test_calibrate_reads_a_folder_of_bags_and_sets_the_artifacts_bits(checkpoints, bags, tmp_path, capsys):
    folder = tmp_path / "recorded"
    folder.mkdir()
    for bag in bags[:2]:
        shutil.copytree(bag, folder / bag.name)
    files = params_files(tmp_path, checkpoints[(True, "openpi")], [folder], method="rtn")
    args = ["calibrate", *[a for f in files for a in ("--params-file", str(f))]]
    assert main([*args, "--w-bits", "8"]) == 2
    assert "--w-bits and --a-bits set the artifact's bits; pass --artifact" in capsys.readouterr().err
    assert main([*args, "--artifact", str(tmp_path / "w8"), "--w-bits", "8", "--a-bits", "8"]) == 0
    assert "Wrote " + str(tmp_path / "w8") + ": rtn W8A8" in capsys.readouterr().out
    buffer = load_buffer(tmp_path / "calib.safetensors")
    assert [s["bag"] for s in buffer.manifest["sources"]] == ["run_mcap", "run_sqlite"]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("folder", "is an existing folder; give the path of a file"),
        ("under_file", "which is a file; give a path inside a folder"),
        ("artifact_file", "is an existing file; give the path of a folder"),
        ("mapping", "camera_names ['top'] are not cameras of this policy"),
    ],
)
def test_outputs_and_mapping_are_checked_before_any_bag_is_read(checkpoints, tmp_path, where, message):
    (tmp_path / "calib.safetensors").mkdir()
    (tmp_path / "a_file").write_text("x")
    calibration = {
        "folder": {},
        "under_file": {"buffer": str(tmp_path / "a_file" / "calib.safetensors")},
        "artifact_file": {"buffer": str(tmp_path / "ok.safetensors"), "artifact": str(tmp_path / "a_file")},
        "mapping": {"buffer": str(tmp_path / "ok.safetensors")},
    }[where]
    # The bag does not exist: a check made only after reading bags would name the bag instead.
    files = params_files(tmp_path, checkpoints[(True, "openpi")], [tmp_path / "no_bag"], **calibration)
    if where == "mapping":
        policy_yaml = yaml.safe_load(files[0].read_text())
        policy_yaml["/**"]["ros__parameters"].update(camera_names=["top"], camera_topics=["/t"], camera_types=["raw"])
        files[0].write_text(yaml.safe_dump(policy_yaml))
    exe = Path(sys.executable).parent / "calibration_node"
    cmd = [str(exe), "--ros-args", *[a for f in files for a in ("--params-file", str(f))]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert main(["calibrate", *[a for f in files for a in ("--params-file", str(f))]]) == 2
