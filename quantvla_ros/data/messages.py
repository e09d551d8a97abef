"""ROS message contents -> numpy, shared by the live policy node and the rosbag reader.

Functions take plain fields (or any object with the message's field names), so the same code
converts rclpy messages and `rosbags`-deserialized ones: calibration and deployment then
preprocess identically. Images are converted by hand with numpy, honouring `step` (row
padding), never through cv_bridge. Every failure is a `MessageError` whose text names the cause.

A sender controls every header field, so nothing here allocates from a header's claims: raw
images are read in place and cut to `max_pixels`, compressed ones are refused from their header
before they are decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from quantvla_ros.errors import QuantVLAError

CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
# 16 MP: above every robot camera (4K is 8.3 MP) and below PIL's own bomb limit, and it keeps one
# decoded frame under 50 MB.
MAX_PIXELS = 4096 * 4096
# Drivers pad rows for alignment (to 64 bytes, to a CUDA pitch of 512); more is not padding.
MAX_ROW_PADDING = 4096
COMPRESSED_FORMATS = ("JPEG", "PNG")
# The only causes a MessageError may carry: diagnostics and log-once keys are these, never a
# sender's text, so what a sender writes cannot grow either.
CAUSES = frozenset(
    {"encoding", "size", "pixels", "step", "data", "decode", "joint-size", "joint-missing", "joint-nan", "stamp"}
    | {"observation"}  # the policy refused the observation (ros/policy_node.py)
)
# Seconds a stamp holds: builtin_interfaces/Time.sec is an int32.
MAX_STAMP_SECONDS = 2**31 - 1


class MessageError(QuantVLAError):
    """A message that cannot be used; `cause` (one of CAUSES) groups repeats for log-once reporting."""

    def __init__(self, cause: str, message: str) -> None:
        assert cause in CAUSES, cause
        super().__init__(message)
        self.cause = cause


def cut(text: str, limit: int) -> str:
    """`text` in at most about `limit` characters, its middle left out: a sender's text goes into
    messages and logs, never whole, and an error's closing advice survives."""
    if len(text) <= limit:
        return text
    return f"{text[: limit * 2 // 3]} ... {text[-(limit // 3) :]}"


def shown(value: object, limit: int = 40) -> str:
    return cut(repr(value), limit)


def _bytes(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:  # a list of ints rather than a buffer
        return np.frombuffer(bytes(data), dtype=np.uint8)


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise MessageError(
            "pixels",
            f"{what} is {width}x{height}, more than max_image_pixels={max_pixels} pixels; "
            "send smaller frames or raise max_image_pixels",
        )


def image_to_rgb(msg, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) -> uint8 H×W×3 RGB, a fresh array."""
    encoding = str(msg.encoding).lower()
    if encoding not in CHANNELS:
        raise MessageError(
            "encoding", f"image encoding {shown(msg.encoding)} is not supported; use one of {sorted(CHANNELS)}"
        )
    channels = CHANNELS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise MessageError("size", f"image has size {width}x{height}; both must be positive")
    _check_pixels(width, height, max_pixels, "image")
    row = width * channels
    if step < row:
        raise MessageError("step", f"image step {step} is shorter than a row of {width} {encoding} pixels")
    if step > row + MAX_ROW_PADDING:
        raise MessageError(
            "step", f"image step {step} pads each row of {row} bytes by more than {MAX_ROW_PADDING}; send step={row}"
        )
    data = _bytes(msg.data)
    if data.size < step * (height - 1) + row:
        raise MessageError("data", f"image data has {data.size} bytes; {width}x{height} {encoding} needs more")
    # Rows are read where they lie, so the last row's padding may be missing from the data.
    rows = np.lib.stride_tricks.as_strided(data, (height, row), (step, 1), writeable=False)
    rows = rows.reshape(height, width, channels)
    if encoding == "mono8":
        return np.repeat(rows, 3, axis=2)
    if encoding.startswith("bgr"):
        rows = rows[..., 2::-1]
    return np.array(rows[..., :3])


def compressed_to_rgb(msg, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg / png) -> uint8 H×W×3 RGB."""
    what = f"compressed image ({shown(msg.format)})"
    try:
        # PIL warns, then refuses, past its own limits; both are this node's "pixels" cause.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(_bytes(msg.data).tobytes()), formats=COMPRESSED_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise MessageError("pixels", f"{what} is larger than any camera frame ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MessageError("decode", f"{what} is not a readable JPEG or PNG ({shown(str(e), 120)})") from None
    with img:
        _check_pixels(*img.size, max_pixels, what)
        try:
            return np.asarray(img.convert("RGB")).copy()
        except (OSError, ValueError, SyntaxError) as e:
            raise MessageError("decode", f"{what} could not be decoded ({shown(str(e), 120)})") from None


def joint_positions(msg, joints: list[str]) -> np.ndarray:
    """sensor_msgs/JointState -> finite float32 positions in the order of `joints`."""
    names = list(msg.name)
    positions = np.asarray(msg.position, dtype=np.float64)
    if len(names) != positions.size:
        raise MessageError("joint-size", f"joint state has {len(names)} names but {positions.size} positions")
    index = {n: i for i, n in enumerate(names)}
    missing = [j for j in joints if j not in index]
    if missing:
        raise MessageError("joint-missing", f"joint state lacks joint(s) {missing}")
    state = positions[[index[j] for j in joints]]
    usable = np.isfinite(state) & (np.abs(state) <= np.finfo(np.float32).max)
    if not usable.all():
        bad = [j for j, ok in zip(joints, usable, strict=True) if not ok]
        raise MessageError("joint-nan", f"joint state has NaN, Inf or a value beyond float32 range for {bad}")
    return state.astype(np.float32)


def stamp_nanoseconds(stamp) -> int:
    """A header stamp in nanoseconds, with nanosec carried into sec; 0 means unstamped.

    A stamp that no builtin_interfaces/Time can hold once normalized (negative, or beyond int32
    seconds) would wrap around when echoed into a published header.
    """
    sec, nanosec = int(stamp.sec), int(stamp.nanosec)
    total = sec * 1_000_000_000 + nanosec
    if sec < 0 or total // 1_000_000_000 > MAX_STAMP_SECONDS:
        raise MessageError(
            "stamp",
            f"header stamp ({sec} s, {nanosec} ns) is not a time a ROS header can carry; "
            f"stamp frames with the sender's clock, or 0 to let this node stamp them",
        )
    return total
