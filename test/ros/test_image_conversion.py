"""sensor_msgs image fields <-> numpy, including every malformed case a camera can send."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from clustvit_ros.ros.image_conversion import (FrameError, decode_compressed, decode_image, label_image_fields)

BGR = np.zeros((4, 6, 3), np.uint8)
BGR[..., 0], BGR[..., 1], BGR[..., 2] = 10, 120, 240  # distinct B, G, R


def _fields(array: np.ndarray, pad: int = 0):
    rows = array.reshape(array.shape[0], -1).view(np.uint8)
    if pad:
        rows = np.concatenate([rows, np.full((rows.shape[0], pad), 77, np.uint8)], axis=1)
    return rows.shape[1], rows.tobytes()


@pytest.mark.parametrize("encoding, array", [
    ("bgr8", BGR),
    ("rgb8", BGR[..., ::-1]),
    ("bgra8", np.dstack([BGR, np.full((4, 6), 255, np.uint8)])),
    ("rgba8", np.dstack([BGR[..., ::-1], np.full((4, 6), 255, np.uint8)])),
])
def test_colour_encodings_come_out_bgr(encoding, array):
    step, data = _fields(np.ascontiguousarray(array), pad=3)  # rows padded beyond width x pixel size
    decoded = decode_image(encoding, 4, 6, step, data)
    assert decoded.shape == (4, 6, 3) and decoded.dtype == np.uint8
    assert (decoded == BGR).all()


def test_mono_encodings():
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    step, data = _fields(grey)
    decoded = decode_image("mono8", 4, 6, step, data)
    assert decoded.shape == (4, 6, 3) and (decoded[..., 0] == grey).all() and (decoded[..., 2] == grey).all()
    wide = grey.astype(np.uint16) * 256 + 255  # 16-bit values scale down to the high byte
    for bigendian, dtype in ((0, "<u2"), (1, ">u2")):
        step, data = _fields(wide.astype(dtype))
        assert (decode_image("mono16", 4, 6, step, data, is_bigendian=bigendian)[..., 1] == grey).all()


def test_bayer_is_demosaiced():
    mosaic = np.full((8, 8), 128, np.uint8)
    step, data = _fields(mosaic)
    assert decode_image("bayer_rggb8", 8, 8, step, data).shape == (8, 8, 3)


@pytest.mark.parametrize("encoding, height, width, step, size, reason", [
    ("32FC1", 4, 6, 24, 96, "unsupported encoding '32FC1'"),
    ("bgr8", 0, 6, 18, 0, "empty image"),
    ("bgr8", 4, 0, 0, 0, "empty image"),
    ("bgr8", 4, 6, 10, 40, "step 10 is smaller than width x pixel size = 18"),
    ("bgr8", 4, 6, 18, 50, "data has 50 bytes"),
    ("bgr8", 4, 6, 18, 100, "data has 100 bytes"),
])
def test_malformed_frames_are_rejected_with_reasons(encoding, height, width, step, size, reason):
    with pytest.raises(FrameError, match=reason):
        decode_image(encoding, height, width, step, bytes(size))


def test_oversized_frame_is_rejected_before_decoding():
    with pytest.raises(FrameError, match="7680x4320 image exceeds max_input_pixels"):
        decode_image("bgr8", 4320, 7680, 7680 * 3, bytes(7680 * 3 * 4320), max_pixels=4096 * 4096)


def test_compressed_round_trip_and_corruption():
    frame = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
    decoded = decode_compressed("jpeg", jpeg.tobytes())
    assert decoded.shape == (32, 48, 3)
    with pytest.raises(FrameError, match="cannot decode compressed image"):
        decode_compressed("jpeg", jpeg.tobytes()[:40] + b"garbage" * 10)
    with pytest.raises(FrameError, match="empty compressed image"):
        decode_compressed("jpeg", b"")


def test_label_fields():
    labels = np.array([[0, 1], [2, 10]], np.uint8)
    fields = label_image_fields(labels)
    assert fields["encoding"] == "mono8" and fields["step"] == 2 and fields["data"] == labels.tobytes()
    many = np.array([[300, 1]], np.uint16)
    fields = label_image_fields(many)
    assert fields["encoding"] == "mono16" and fields["step"] == 4 and fields["is_bigendian"] == 0
    assert np.frombuffer(fields["data"], "<u2").tolist() == [300, 1]
