"""ROS message contents -> numpy, shared by the live policy node and the rosbag reader.

Functions take plain fields (or any object with the message's field names), so the same code
converts rclpy messages and `rosbags`-deserialized ones: calibration and deployment then
preprocess identically. Images are converted by hand with numpy, honouring `step` (row
padding), never through cv_bridge. Every failure is a `MessageError` whose text names the cause.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from quantvla_ros.errors import QuantVLAError

CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


class MessageError(QuantVLAError):
    """A message that cannot be used; `cause` groups repeats for log-once reporting."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


def _bytes(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(bytes(data), dtype=np.uint8)


def image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) -> uint8 H×W×3 RGB, a fresh array."""
    encoding = str(msg.encoding).lower()
    if encoding not in CHANNELS:
        raise MessageError(
            f"encoding:{encoding}", f"image encoding {msg.encoding!r} is not supported; use one of {sorted(CHANNELS)}"
        )
    channels = CHANNELS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise MessageError("size", f"image has size {width}x{height}; both must be positive")
    if step < width * channels:
        raise MessageError("step", f"image step {step} is shorter than a row of {width} {encoding} pixels")
    data = _bytes(msg.data)
    if data.size < step * (height - 1) + width * channels:
        raise MessageError("data", f"image data has {data.size} bytes; {width}x{height} {encoding} needs more")
    if data.size < step * height:  # the last row's padding may be omitted
        data = np.concatenate([data, np.zeros(step * height - data.size, np.uint8)])
    rows = data[: step * height].reshape(height, step)[:, : width * channels].reshape(height, width, channels)
    if encoding == "mono8":
        return np.repeat(rows, 3, axis=2)
    if encoding.startswith("bgr"):
        rows = rows[..., 2::-1]
    return np.ascontiguousarray(rows[..., :3])


def compressed_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg / png) -> uint8 H×W×3 RGB."""
    try:
        with Image.open(io.BytesIO(_bytes(msg.data).tobytes())) as img:
            return np.asarray(img.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MessageError("decode", f"compressed image ({msg.format!r}) could not be decoded: {e}") from None


def joint_positions(msg, joints: list[str]) -> np.ndarray:
    """sensor_msgs/JointState -> positions in the order of `joints` (float32)."""
    names = list(msg.name)
    positions = np.asarray(msg.position, dtype=np.float64)
    if len(names) != positions.size:
        raise MessageError("joint-size", f"joint state has {len(names)} names but {positions.size} positions")
    index = {n: i for i, n in enumerate(names)}
    missing = [j for j in joints if j not in index]
    if missing:
        raise MessageError("joint-missing", f"joint state lacks joint(s) {missing}")
    return positions[[index[j] for j in joints]].astype(np.float32)


def stamp_seconds(stamp) -> float:
    return int(stamp.sec) + int(stamp.nanosec) * 1e-9
