"""sensor_msgs/Image and CompressedImage <-> numpy, without cv_bridge.

Decoding validates everything a malformed message can get wrong (encoding,
sizes, step, data length, a compressed header's claimed size) before any OpenCV
call, and raises ``FrameError`` with a bounded reason instead of crashing,
reading out of bounds or allocating what the header claims. Frames come out as
BGR uint8 (OpenCV's order).
"""
from __future__ import annotations

from typing import Any, Optional

import cv2
import numpy as np

from ..inference.image_headers import COMPRESSED_FORMATS, ImageHeaderError, compressed_header
from .limits import bounded


class FrameError(ValueError):
    """A frame that cannot be used; the message says why."""

# encoding -> (channels, bytes per channel, conversion to BGR or None)
_ENCODINGS: dict[str, tuple[int, int, Any]] = {
    "bgr8": (3, 1, None),
    "rgb8": (3, 1, cv2.COLOR_RGB2BGR),
    "bgra8": (4, 1, cv2.COLOR_BGRA2BGR),
    "rgba8": (4, 1, cv2.COLOR_RGBA2BGR),
    "mono8": (1, 1, cv2.COLOR_GRAY2BGR),
    "mono16": (1, 2, cv2.COLOR_GRAY2BGR),
    "bgr16": (3, 2, None),
    "rgb16": (3, 2, cv2.COLOR_RGB2BGR),
    "bgra16": (4, 2, cv2.COLOR_BGRA2BGR),
    "rgba16": (4, 2, cv2.COLOR_RGBA2BGR),
    "8UC1": (1, 1, cv2.COLOR_GRAY2BGR),
    "8UC3": (3, 1, None),
    "8UC4": (4, 1, cv2.COLOR_BGRA2BGR),
    "16UC1": (1, 2, cv2.COLOR_GRAY2BGR),
    # Raw Bayer mosaics, as many industrial cameras publish them.
    "bayer_rggb8": (1, 1, cv2.COLOR_BayerRGGB2BGR),
    "bayer_bggr8": (1, 1, cv2.COLOR_BayerBGGR2BGR),
    "bayer_gbrg8": (1, 1, cv2.COLOR_BayerGBRG2BGR),
    "bayer_grbg8": (1, 1, cv2.COLOR_BayerGRBG2BGR),
    "yuv422_yuy2": (2, 1, cv2.COLOR_YUV2BGR_YUY2),
    "yuv422": (2, 1, cv2.COLOR_YUV2BGR_UYVY),
}
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)
# 4:2:2 chroma is shared by pixel pairs: these need an even width.
_PAIRED_PIXELS = {"yuv422", "yuv422_yuy2"}
# OpenCV refuses to decode more pixels than this (CV_IO_MAX_IMAGE_PIXELS); we refuse first.
OPENCV_MAX_PIXELS = 1 << 30


def decode_image(encoding: str, height: int, width: int, step: int, data, is_bigendian: int = 0,
                 max_pixels: int = 0) -> np.ndarray:
    """Raw image fields -> BGR uint8 (height, width, 3).

    16-bit data is scaled to 8 bits (value / 256), as cv_bridge does for display.
    """
    spec = _ENCODINGS.get(encoding)
    if spec is None:
        raise FrameError(f"unsupported encoding {bounded(repr(encoding), 60)} "
                         f"(supported: {', '.join(SUPPORTED_ENCODINGS)})")
    if height <= 0 or width <= 0:
        raise FrameError(f"empty image ({width}x{height})")
    if max_pixels and height * width > max_pixels:
        raise FrameError(f"{width}x{height} image exceeds max_input_pixels ({max_pixels})")
    if encoding in _PAIRED_PIXELS and width % 2:
        raise FrameError(f"{encoding} needs an even width (4:2:2 pixel pairs), got {width}")
    channels, depth, conversion = spec
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise FrameError(f"step {step} is smaller than width x pixel size = {row_bytes}")
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size != step * height:
        raise FrameError(f"data has {buffer.size} bytes, step x height = {step} x {height} = "
                         f"{step * height} expected")
    rows = np.lib.stride_tricks.as_strided(buffer, shape=(height, row_bytes), strides=(step, 1))
    if depth == 2:
        dtype = np.dtype(">u2" if is_bigendian else "<u2")
        pixels = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
        pixels = (pixels >> 8).astype(np.uint8)
    else:
        pixels = rows.reshape(height, width, channels)
    if channels == 1:
        pixels = pixels[..., 0]
    if conversion is None:
        return np.ascontiguousarray(pixels)
    try:
        return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)
    except cv2.error as exc:  # anything the checks above did not foresee is still this frame's fault
        raise FrameError(f"cannot convert {encoding} {width}x{height}: {bounded(exc, 120)}") from None


def decode_compressed(format_name: str, data, max_pixels: int = 0) -> np.ndarray:
    """CompressedImage fields (JPEG or PNG, as image_transport sends them) -> BGR uint8.

    The header's size is checked against ``max_pixels`` (and OpenCV's own limit)
    before decoding, so a small file claiming a huge image costs nothing.
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size == 0:
        raise FrameError("empty compressed image")
    declared = (format_name or "").lower()
    named = [name for name in ("jpeg", "jpg", "png", "bmp", "tiff", "tif", "webp", "jp2", "ppm", "pgm", "exr",
                               "hdr", "gif") if name in declared]
    if named and not set(named) <= {"jpeg", "jpg", "png"}:
        raise FrameError(f"compressed format {bounded(repr(format_name), 60)} is not accepted "
                         f"(only {', '.join(COMPRESSED_FORMATS)}, as image_transport sends them)")
    try:
        container, width, height = compressed_header(buffer[:65536].tobytes())
    except ImageHeaderError as exc:
        raise FrameError(f"cannot decode compressed image: {exc}") from None
    if width == 0 or height == 0:
        raise FrameError(f"cannot decode compressed image: its {container} header declares {width}x{height}")
    if max_pixels and width * height > max_pixels:
        raise FrameError(f"{width}x{height} image exceeds max_input_pixels ({max_pixels}) "
                         f"(declared in its {container} header; not decoded)")
    if width * height > OPENCV_MAX_PIXELS:
        raise FrameError(f"{width}x{height} image exceeds OpenCV's decoding limit ({OPENCV_MAX_PIXELS} pixels) "
                         f"(declared in its {container} header; not decoded)")
    try:
        image: Optional[np.ndarray] = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise FrameError(f"cannot decode compressed image ({container}): {bounded(exc, 120)}") from None
    if image is None:
        raise FrameError(f"cannot decode compressed image (format {bounded(repr(format_name), 60)}, "
                         f"{buffer.size} bytes)")
    if max_pixels and image.shape[0] * image.shape[1] > max_pixels:
        raise FrameError(f"{image.shape[1]}x{image.shape[0]} image exceeds max_input_pixels ({max_pixels})")
    return image


def label_image_fields(labels: np.ndarray) -> dict:
    """Fields of a sensor_msgs/Image holding class indices: mono8, or mono16 above 255 classes."""
    if labels.dtype == np.uint8:
        encoding, step = "mono8", labels.shape[1]
    elif labels.dtype == np.uint16:
        encoding, step = "mono16", 2 * labels.shape[1]
        labels = labels.astype("<u2", copy=False)
    else:
        raise ValueError(f"labels must be uint8 or uint16, got {labels.dtype}")
    return {"height": labels.shape[0], "width": labels.shape[1], "encoding": encoding,
            "is_bigendian": 0, "step": step, "data": np.ascontiguousarray(labels).tobytes()}


def bgr_image_fields(image: np.ndarray) -> dict:
    return {"height": image.shape[0], "width": image.shape[1], "encoding": "bgr8", "is_bigendian": 0,
            "step": 3 * image.shape[1], "data": np.ascontiguousarray(image).tobytes()}
