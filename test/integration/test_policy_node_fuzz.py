"""Fuzz: the policy node, started as launch starts it, under a few thousand malformed messages.

Every input type gets malformed messages (encodings, sizes, steps, image bombs, NaN/Inf/huge joint
arrays, odd stamps, long and odd instructions, undecodable bytes, bursts), each sent with valid
messages on the other inputs so the node converts it rather than waiting for a missing input.
Rounds of them alternate with valid observations. Bounded to well under three minutes.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import rclpy
from node_fixtures import (
    STATE_JOINTS,
    STATUS_NAME,
    joints,
    jpeg,
    jpeg_claiming,
    memory_kib,
    params,
    raw_image,
    stamp_now,
    start_node,
    stop,
)
from PIL import Image as PILImage
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

pytestmark = pytest.mark.integration
ROUNDS = 30
MESSAGES_PER_ROUND = 80
MAX_INPUT_AGE = 0.5
# Resident memory may grow by this much over the node's own after start-up (a pixel-limited
# frame is 50 MB; the bombs this test sends claimed up to 4.8 GB).
MEMORY_GROWTH_MIB = 250


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (with a valid CRC) claims width x height over a tiny compressed stream."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


class Fuzzer:
    """Malformed messages of every input type, drawn from a seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        buf = io.BytesIO()
        PILImage.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="BMP")
        self.bmp = buf.getvalue()
        self.kinds = [self.raw, self.compressed, self.joint_state, self.instruction, self.stamp]

    def text(self, n: int) -> str:
        alphabet = list("abcxyz019 _-/.;:'\"\\\t\n") + ["é", "ß", "中", "文", "🤖", "\u202e", "\u200b", "\ufeff"]
        return "".join(self.rng.choice(alphabet, n))

    def raw(self) -> Image:
        r = self.rng
        w, h = int(r.integers(1, 64)), int(r.integers(1, 48))
        cases = [
            lambda: Image(height=h, width=w, encoding=self.text(int(r.integers(0, 1000))), step=w * 3, data=b"x" * 9),
            lambda: Image(height=1, width=1, encoding="rgb8", step=2**32 - 1, data=b"abc"),
            lambda: Image(height=h, width=w, encoding="rgb8", step=w * 3 + 5000, data=bytes(h * (w * 3 + 5000))),
            lambda: Image(height=h, width=w, encoding="rgb8", step=w * 3 - 1, data=bytes(h * w * 3)),
            lambda: Image(height=2**32 - 1, width=2**32 - 1, encoding="mono8", step=2**32 - 1, data=b"\x00" * 16),
            lambda: Image(height=4000, width=4000, encoding="mono8", step=4000, data=b"\x00" * 4000),
            lambda: Image(height=0, width=w, encoding="bgr8", step=w * 3, data=b""),
            lambda: Image(height=h, width=w, encoding="rgba8", step=w * 4, data=bytes(w * 4 * h - 1)),
            lambda: raw_image(width=int(r.integers(500, 3000)), height=1, pad=0),  # extreme aspect ratio
            lambda: raw_image(width=1, height=int(r.integers(500, 3000)), pad=0, encoding="mono8"),
        ]
        return cases[int(r.integers(len(cases)))]()

    def compressed(self) -> CompressedImage:
        r = self.rng
        real = jpeg().data
        cases = [
            lambda: jpeg_claiming(12000, 12000),
            lambda: jpeg_claiming(65500, 65500),
            lambda: jpeg_claiming(int(r.integers(4097, 30000)), int(r.integers(4097, 30000))),
            lambda: png_claiming(100_000, 100_000),
            lambda: png_claiming(2**31 - 1, 1),
            lambda: bytes(real[: int(r.integers(1, len(real)))]),
            lambda: r.integers(0, 256, int(r.integers(0, 2000)), dtype=np.uint8).tobytes(),
            lambda: self.bmp,
            lambda: b"",
        ]
        data = cases[int(r.integers(len(cases)))]()
        return CompressedImage(format=self.text(int(r.integers(0, 300))), data=data)

    def joint_state(self) -> JointState:
        r = self.rng
        n = len(STATE_JOINTS)
        cases = [
            lambda: joints(values=[np.nan] * n),
            lambda: joints(values=[float(r.choice([np.inf, -np.inf, 1e300, -1e39, np.nan]))] + [0.0] * (n - 1)),
            lambda: joints(values=[1e38] * n),  # finite in float32: the node must not output NaN for it
            lambda: JointState(name=STATE_JOINTS, position=[0.0] * int(r.integers(0, n))),
            lambda: JointState(name=[f"j{i}" for i in range(100_000)], position=np.zeros(100_000).tolist()),
            lambda: JointState(name=[self.text(50) for _ in range(n)], position=[0.0] * n),
            lambda: JointState(name=STATE_JOINTS + STATE_JOINTS, position=[0.0] * 2 * n),
            lambda: JointState(),
        ]
        return cases[int(r.integers(len(cases)))]()

    def instruction(self) -> String:
        r = self.rng
        cases = [
            lambda: "",
            lambda: "pick up the red cup " * 50_000,  # 1 MB
            lambda: self.text(int(r.integers(1, 3000))),
            lambda: "\u202e" * 500 + "open the drawer",
            lambda: "🤖" * 2000,
        ]
        return String(data=cases[int(r.integers(len(cases)))]())

    def stamp(self) -> Image:
        msg = raw_image()
        sec, nanosec = [(2**31 - 1, 2**32 - 1), (-1, 0), (-(2**31), 999), (int(time.time()) + 10**6, 0)][
            int(self.rng.integers(4))
        ]
        msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nanosec
        return msg


def test_fuzz_keeps_the_node_alive_bounded_and_safe(policy_path, peer, tmp_path):
    # 100 Hz: nearly every malformed message is converted before the next replaces it.
    proc = start_node(params(policy_path, inference_rate=100.0, max_input_age=MAX_INPUT_AGE), tmp_path)
    fuzz = Fuzzer()
    sent = 0
    resume_s: list[float] = []

    def valid_base() -> Image:
        image = raw_image()
        stamp_now(image)
        return image

    def valid() -> None:
        peer.base.publish(valid_base())
        peer.wrist.publish(jpeg())
        peer.joints.publish(joints())

    try:
        peer.instruction.publish(String(data="pick up the red cup"))
        assert peer.wait_for(lambda: peer.trajectories, 60, valid), stop(proc)
        start_kib = memory_kib(proc.pid, "VmRSS")
        garbage = serialize_message(valid_base())[:40]
        for _ in range(ROUNDS):
            for _ in range(MESSAGES_PER_ROUND):
                kind = fuzz.kinds[int(fuzz.rng.integers(len(fuzz.kinds)))]
                msg = kind()
                base = msg if isinstance(msg, Image) else valid_base()
                peer.base.publish(base)
                peer.wrist.publish(msg if isinstance(msg, CompressedImage) else jpeg())
                peer.joints.publish(msg if isinstance(msg, JointState) else joints())
                if isinstance(msg, String):
                    peer.instruction.publish(msg)
                rclpy.spin_once(peer.node, timeout_sec=0.01)
                sent += 1
            for _ in range(3):  # bytes no deserializer accepts, and a burst of valid frames
                peer.base.publish(garbage)
                peer.joints.publish(garbage)
            for _ in range(50):
                peer.base.publish(valid_base())
            sent += 56
            assert proc.poll() is None, stop(proc)
            count = len(peer.trajectories)
            started = time.time_ns()
            assert peer.wait_for(lambda c=count: len(peer.trajectories) > c, 10, valid), stop(proc)
            first = next(received for _, received in peer.timestamps[count:])
            resume_s.append((first - started) * 1e-9)
        peak_kib = memory_kib(proc.pid, "VmHWM")
        peer.spin(1.5, valid)  # one more diagnostics message
    finally:
        out = stop(proc)
    assert sent >= 2500
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    for msg in peer.trajectories:
        assert all(np.isfinite(p.positions).all() for p in msg.points)
    for msg, (published, _) in zip(peer.trajectories, peer.timestamps, strict=True):
        observed = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        # The frame's stamp is when the peer sent it; the node's age check starts on arrival, later.
        assert (published - observed) * 1e-9 <= MAX_INPUT_AGE + 0.1, (published - observed) * 1e-9
    assert np.median(resume_s) < 1.0 and max(resume_s) < 5.0, resume_s
    assert (peak_kib - start_kib) / 1024 < MEMORY_GROWTH_MIB, (start_kib, peak_kib)
    statuses = [s for d in peer.diagnostics for s in d.status if s.name == STATUS_NAME]
    assert statuses and max(sum(len(kv.value) for kv in s.values) + len(s.message) for s in statuses) < 2500
    node_lines = [line for line in out.splitlines() if "[policy_node]" in line]
    assert len(node_lines) < 40, node_lines
