"""ROS 2 node that plays a video file, an image folder or a single image as a camera.

Publishes sensor_msgs/Image on ``image`` (or CompressedImage on ``image/compressed``)
at ``rate`` Hz, stamped with the current time and ``frame_id``; loops when asked.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import QoSProfile
from sensor_msgs.msg import CompressedImage, Image

from .runner import run_node

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".webp"}


class SourceError(RuntimeError):
    pass


def open_frames(source: str) -> tuple[Iterator[np.ndarray], Optional[float]]:
    """BGR frames of a video, an image folder (sorted by name) or one image; and the video's fps."""
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{source}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(f"{source}: no images in folder")
        return (_read_image(p) for p in files), None
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return iter([_read_image(path)]), None
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SourceError(f"{source}: cannot open as a video")
    fps = capture.get(cv2.CAP_PROP_FPS) or None

    def frames() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield frame
        finally:
            capture.release()
    return frames(), fps


def _read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SourceError(f"{path}: cannot be read as an image")
    return image


class ImageSource(Node):
    def __init__(self, **kwargs):
        super().__init__("image_source", **kwargs)
        self.source = self.declare_parameter("source", "", ParameterDescriptor(
            description="video file, image folder or image", read_only=True)).value
        rate = self.declare_parameter("rate", 0.0, ParameterDescriptor(
            description="frames per second; 0 = the video's own rate (10 for images)", read_only=True,
            floating_point_range=[FloatingPointRange(from_value=0.0, to_value=1000.0, step=0.0)])).value
        self.loop = self.declare_parameter("loop", True).value
        self.frame_id = self.declare_parameter("frame_id", "camera").value
        self.encoding = self.declare_parameter("encoding", "bgr8", ParameterDescriptor(
            description="bgr8, rgb8 or mono8", read_only=True)).value
        self.transport = self.declare_parameter("transport", "raw", ParameterDescriptor(
            description="raw (Image on 'image') or compressed (JPEG on 'image/compressed')",
            read_only=True)).value
        self.jpeg_quality = self.declare_parameter("jpeg_quality", 90, ParameterDescriptor(
            integer_range=[IntegerRange(from_value=1, to_value=100, step=1)])).value
        self.width = self.declare_parameter("width", 0, ParameterDescriptor(
            description="resize frames to this width (0 = as read)", read_only=True)).value
        self.height = self.declare_parameter("height", 0, ParameterDescriptor(
            description="resize frames to this height (0 = as read)", read_only=True)).value
        self.max_frames = self.declare_parameter("max_frames", 0, ParameterDescriptor(
            description="stop after this many frames (0 = no limit)")).value
        self.wait_for_subscribers = self.declare_parameter("wait_for_subscribers", False, ParameterDescriptor(
            description="hold the first frame until someone subscribes (no frames lost to discovery)",
            read_only=True)).value
        if not self.source:
            raise SourceError("parameter 'source' is required (video, image folder or image)")
        if self.encoding not in ("bgr8", "rgb8", "mono8"):
            raise SourceError(f"encoding {self.encoding!r}: expected bgr8, rgb8 or mono8")
        if self.transport not in ("raw", "compressed"):
            raise SourceError(f"transport {self.transport!r}: expected raw or compressed")
        self.frames, fps = open_frames(self.source)
        self.rate = rate or fps or 10.0
        self.finished = False
        self.published = 0
        if self.transport == "compressed":
            topic = self.resolve_topic_name("image") + "/compressed"
            self.publisher = self.create_publisher(CompressedImage, topic, QoSProfile(depth=1))
        else:
            topic = self.resolve_topic_name("image")
            self.publisher = self.create_publisher(Image, topic, QoSProfile(depth=1))
        self.timer = self.create_timer(1.0 / self.rate, self._tick)
        self.get_logger().info(f"playing {self.source} on {topic} at {self.rate:g} Hz"
                               + (" (looping)" if self.loop else ""))

    def _next_frame(self) -> Optional[np.ndarray]:
        frame = next(self.frames, None)
        if frame is None and self.loop:
            self.frames, _ = open_frames(self.source)
            frame = next(self.frames, None)
        return frame

    def _tick(self) -> None:
        if self.wait_for_subscribers and self.published == 0 and self.publisher.get_subscription_count() == 0:
            return
        frame = self._next_frame()
        if frame is None or (self.max_frames and self.published >= self.max_frames):
            self.get_logger().info(f"end of {self.source} after {self.published} frames")
            self.timer.cancel()
            self.finished = True
            return
        if self.width and self.height:
            frame = cv2.resize(frame, (self.width, self.height), interpolation=cv2.INTER_AREA)
        stamp = self.get_clock().now().to_msg()
        if self.transport == "compressed":
            ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            message = CompressedImage(format="jpeg", data=data.tobytes())
        else:
            message = Image(height=frame.shape[0], width=frame.shape[1], encoding=self.encoding, is_bigendian=0)
            if self.encoding == "rgb8":
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            elif self.encoding == "mono8":
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            message.step = frame.shape[1] * (1 if frame.ndim == 2 else 3)
            message.data = np.ascontiguousarray(frame).tobytes()
        message.header.stamp = stamp
        message.header.frame_id = self.frame_id
        self.publisher.publish(message)
        self.published += 1


def main(args=None) -> int:
    return run_node(ImageSource, "image_source", (SourceError,), args, finished=lambda node: node.finished)


if __name__ == "__main__":
    sys.exit(main())
