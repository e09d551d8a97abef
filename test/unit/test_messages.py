"""Message conversion under hostile headers: nothing allocates from a header's claims."""

from __future__ import annotations

import io
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
from node_fixtures import jpeg_claiming
from PIL import Image as PILImage

from quantvla_ros.data import messages
from quantvla_ros.data.messages import MessageError, compressed_to_rgb, image_to_rgb, joint_positions

pytestmark = pytest.mark.unit


def raw(height=2, width=3, encoding="rgb8", step=None, data=None):
    channels = {"rgb8": 3, "mono8": 1}.get(encoding, 3)
    step = width * channels if step is None else step
    data = bytes(range(256)) * (step * height // 256 + 1) if data is None else data
    return SimpleNamespace(height=height, width=width, encoding=encoding, step=step, data=data[: step * height])


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.full((height, width, 3), 7, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def peak_bytes(function, *args) -> tuple[object, int]:
    tracemalloc.start()
    try:
        try:
            result = function(*args)
        except MessageError as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_step_far_beyond_the_row_is_refused_without_allocating_it():
    # 1x1 rgb8 with 3 data bytes and a step of 2^27: padding the data to step*height took 128 MB.
    error, peak = peak_bytes(image_to_rgb, raw(height=1, width=1, step=2**27, data=b"\x01\x02\x03"))
    assert isinstance(error, MessageError) and error.cause == "step", error
    assert peak < 1 << 20


def test_row_padding_is_honoured_and_the_last_rows_padding_may_be_missing():
    width, height, step = 3, 4, 16
    data = np.arange(step * height, dtype=np.uint8)
    expected = data.reshape(height, step)[:, : width * 3].reshape(height, width, 3)
    msg = raw(height=height, width=width, step=step, data=data[: step * (height - 1) + width * 3].tobytes())
    out = image_to_rgb(msg)
    np.testing.assert_array_equal(out, expected)
    assert out.flags.writeable and out.flags.c_contiguous


def test_compressed_image_above_the_pixel_limit_is_refused_from_its_header():
    # 5000x5000 (25 MP) claimed by an 8x8 JPEG: decoding it in full took 75 MB and a second.
    msg = SimpleNamespace(format="jpeg", data=jpeg_claiming(5000, 5000))
    error, peak = peak_bytes(compressed_to_rgb, msg)
    assert isinstance(error, MessageError) and error.cause == "pixels", error
    assert "max_image_pixels" in str(error) and peak < 1 << 20


def test_decompression_bomb_headers_are_bad_input_not_crashes():
    for size in (12000, 65500):  # past PIL's warning, then past its refusal
        with pytest.raises(MessageError) as caught:
            compressed_to_rgb(SimpleNamespace(format="jpeg", data=jpeg_claiming(size, size)))
        assert caught.value.cause == "pixels"


def test_pixel_limit_is_a_parameter_for_raw_and_compressed_images():
    assert compressed_to_rgb(SimpleNamespace(format="png", data=png(20, 10)), 200).shape == (10, 20, 3)
    with pytest.raises(MessageError, match="20x10"):
        compressed_to_rgb(SimpleNamespace(format="png", data=png(20, 10)), 199)
    with pytest.raises(MessageError, match="max_image_pixels=5"):
        image_to_rgb(raw(height=2, width=3), 5)


def test_only_jpeg_and_png_are_decoded():
    buf = io.BytesIO()
    PILImage.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="BMP")
    with pytest.raises(MessageError) as caught:
        compressed_to_rgb(SimpleNamespace(format="bmp", data=buf.getvalue()))
    assert caught.value.cause == "decode"


def test_causes_are_a_fixed_vocabulary_and_a_senders_text_is_cut():
    encoding = "x" * 1000
    with pytest.raises(MessageError) as caught:
        image_to_rgb(raw(encoding=encoding))
    assert caught.value.cause == "encoding" and len(str(caught.value)) < 200


def test_values_beyond_float32_are_refused_like_nan():
    msg = SimpleNamespace(name=["a", "b"], position=[0.5, 1e300])
    with pytest.raises(MessageError, match=r"\['b'\]") as caught:
        joint_positions(msg, ["a", "b"])
    assert caught.value.cause == "joint-nan"
    assert joint_positions(msg, ["a"]).tolist() == [0.5]


@pytest.mark.parametrize(
    ("sec", "nanosec", "expected"),
    [(0, 0, 0), (12, 5, 12_000_000_005), (1, 1_500_000_000, 2_500_000_000), (2**31 - 1, 999_999_999, None)],
)
def test_stamps_are_normalized(sec, nanosec, expected):
    got = messages.stamp_nanoseconds(SimpleNamespace(sec=sec, nanosec=nanosec))
    assert got == (expected if expected is not None else (2**31 - 1) * 10**9 + 999_999_999)


@pytest.mark.parametrize(("sec", "nanosec"), [(-1, 0), (2**31 - 1, 2**32 - 1), (-(2**31), 0)])
def test_stamps_a_header_cannot_carry_are_bad_input(sec, nanosec):
    with pytest.raises(MessageError) as caught:
        messages.stamp_nanoseconds(SimpleNamespace(sec=sec, nanosec=nanosec))
    assert caught.value.cause == "stamp"
