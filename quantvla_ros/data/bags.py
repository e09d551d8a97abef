"""Observations from recorded bags: rosbag2 (mcap, sqlite3) and ROS 1, read with `rosbags`.

Two passes per bag. The first reads only timestamps (and the small instruction messages) and
finds the sample times: every message of the first camera at which every other camera and
the joint state have a message no older than `tolerance` (an as-of join, as the live node
sees the newest message of each input) and an instruction has been given. Samples are then
chosen evenly over all bags' candidates, which spreads them over bags and episodes in
proportion to their length. The second pass decodes just the chosen messages, with the same
conversions the policy node uses.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from quantvla_ros.data.mapping import TopicMapping
from quantvla_ros.data.messages import MessageError, compressed_to_rgb, image_to_rgb, joint_positions
from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.policy import Observation
from quantvla_ros.progress import Progress as tqdm

TYPES = {
    "raw": "sensor_msgs/msg/Image",
    "compressed": "sensor_msgs/msg/CompressedImage",
    "instruction": "std_msgs/msg/String",
    "joint_states": "sensor_msgs/msg/JointState",
}


class BagError(QuantVLAError):
    """A bag that cannot be used; the message names the bag and, where it applies, the topic."""


@dataclass
class Candidate:
    bag: int
    time_ns: int
    picks: dict[str, int]  # topic -> timestamp of the message used
    instruction: str


def bag_digest(path: Path) -> tuple[int, str]:
    """Total bytes and SHA-256 over a bag file, or over a rosbag2 folder's files in name order."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    size = 0
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    return size, digest.hexdigest()


def _topics(mapping: TopicMapping) -> dict[str, str]:
    """topic -> expected message type."""
    topics = {t: TYPES[kind] for t, kind in zip(mapping.camera_topics, mapping.camera_types, strict=True)}
    topics[mapping.instruction_topic] = TYPES["instruction"]
    topics[mapping.joint_states_topic] = TYPES["joint_states"]
    return topics


@contextmanager
def _opened(path: Path) -> Iterator[AnyReader]:
    if not path.exists():
        raise BagError(f"Bag {path} does not exist.")
    try:
        reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_JAZZY))
        reader.open()
    except Exception as e:  # rosbags raises several unrelated types for unreadable bags
        raise BagError(f"Bag {path} could not be opened ({e}); is it a complete rosbag2 or ROS 1 bag?") from None
    try:
        yield reader
    finally:
        reader.close()


def _connections(reader: AnyReader, path: Path, topics: dict[str, str]) -> list:
    found = {c.topic: c for c in reader.connections}
    for topic, msgtype in topics.items():
        if topic not in found:
            present = ", ".join(f"{t} ({c.msgtype})" for t, c in sorted(found.items())) or "none"
            raise BagError(
                f"Bag {path} has no topic {topic}; fix the topic mapping or record it (the bag's topics: {present})."
            )
        if found[topic].msgtype != msgtype:
            raise BagError(f"Bag {path}: topic {topic} carries {found[topic].msgtype}, not {msgtype}.")
    return [found[t] for t in topics]


def _candidates(reader: AnyReader, index: int, path: Path, mapping: TopicMapping, tolerance_ns: int) -> list[Candidate]:
    topics = _topics(mapping)
    conns = _connections(reader, path, topics)
    times: dict[str, list[int]] = {t: [] for t in topics}
    instructions: list[tuple[int, str]] = []
    try:
        for conn, t_ns, raw in reader.messages(connections=conns):
            if conn.topic == mapping.instruction_topic:
                instructions.append((t_ns, reader.deserialize(raw, conn.msgtype).data))
            else:
                times[conn.topic].append(t_ns)
    except Exception as e:
        raise BagError(f"Bag {path} is corrupt or truncated ({e}); re-record or repair it.") from None
    primary, others = mapping.camera_topics[0], [*mapping.camera_topics[1:], mapping.joint_states_topic]
    out = []
    instruction_times = [t for t, _ in instructions]
    for t in times[primary]:
        k = bisect.bisect_right(instruction_times, t) - 1
        if k < 0:
            continue
        picks = {primary: t}
        for topic in others:
            j = bisect.bisect_right(times[topic], t) - 1
            if j < 0 or t - times[topic][j] > tolerance_ns:
                break
            picks[topic] = times[topic][j]
        else:
            out.append(Candidate(index, t, picks, instructions[k][1]))
    return out


def _decode(reader: AnyReader, path: Path, mapping: TopicMapping, wanted: list[Candidate]) -> list[Observation]:
    needed = {(topic, t) for c in wanted for topic, t in c.picks.items()}
    conns = [c for c in reader.connections if c.topic in set(mapping.camera_topics) | {mapping.joint_states_topic}]
    messages = {}
    try:
        for conn, t_ns, raw in reader.messages(connections=conns):
            if (conn.topic, t_ns) in needed:
                messages[(conn.topic, t_ns)] = reader.deserialize(raw, conn.msgtype)
    except Exception as e:
        raise BagError(f"Bag {path} is corrupt or truncated ({e}); re-record or repair it.") from None
    out = []
    for c in wanted:
        images = {}
        try:
            for name, topic, kind in zip(
                mapping.camera_names, mapping.camera_topics, mapping.camera_types, strict=True
            ):
                msg = messages[(topic, c.picks[topic])]
                images[name] = compressed_to_rgb(msg) if kind == "compressed" else image_to_rgb(msg)
            topic = mapping.joint_states_topic
            state = joint_positions(messages[(topic, c.picks[topic])], list(mapping.state_joints))
        except MessageError as e:
            raise BagError(f"Bag {path}: topic {topic} has a bad message at t={c.time_ns} ns ({e}).") from None
        out.append(Observation(images=images, instruction=c.instruction, state=state))
    return out


def expand_bags(paths: list[Path]) -> list[Path]:
    """Each path as a bag, or, for a folder that is no bag itself, the bags in it (rosbag2 folders
    and ROS 1 .bag files, in name order), as `quantvla record-demos` writes them."""
    bags = []
    for path in map(Path, paths):
        inner = sorted(
            p for p in path.glob("*") if (p / "metadata.yaml").is_file() or (p.suffix == ".bag" and p.is_file())
        )
        is_folder_of_bags = path.is_dir() and not (path / "metadata.yaml").is_file() and inner
        bags += inner if is_folder_of_bags else [path]
    return bags


def read_observations(
    bags: list[Path], mapping: TopicMapping, samples: int, tolerance: float = 0.1
) -> tuple[list[Observation], list[dict]]:
    """`samples` aligned observations spread over the bags (a folder of bags counts as its bags),
    and a provenance record per bag."""
    bags = expand_bags(bags)
    if not bags:
        raise BagError("No bags were given; pass at least one rosbag2 folder or .bag file.")
    if samples <= 0:
        raise BagError(f"samples must be positive, got {samples}.")
    candidates: list[Candidate] = []
    sources = []
    for i, path in enumerate(tqdm([Path(b) for b in bags], desc="index bags", unit="bag")):
        with _opened(path) as reader:
            found = _candidates(reader, i, path, mapping, int(tolerance * 1e9))
        size, sha = bag_digest(path)
        sources.append({"bag": path.name, "path": str(path), "bytes": size, "sha256": sha, "candidates": len(found)})
        candidates += found
    if not candidates:
        names = ", ".join(s["bag"] for s in sources)
        raise BagError(
            f"No aligned observation in {names}: every camera and the joint state must have a message within "
            f"{tolerance} s of the first camera's, after an instruction; check the topics and the tolerance."
        )
    picked = [candidates[int(i)] for i in np.unique(np.linspace(0, len(candidates) - 1, samples).round())]
    observations = []
    for i, path in enumerate(tqdm([Path(b) for b in bags], desc="decode samples", unit="bag")):
        wanted = [c for c in picked if c.bag == i]
        sources[i]["sample_times_ns"] = [c.time_ns for c in wanted]
        if wanted:
            with _opened(path) as reader:
                observations += _decode(reader, path, mapping, wanted)
    return observations, sources
