"""One camera served by the segmentation node: its topics, its newest frame, its statistics.

Topic names follow image_transport: a camera subscribes ``image`` (or
``<camera>/image``), ``image/compressed`` with compressed transport, and the
``camera_info`` beside the image topic; it publishes under ``~/`` (or
``~/<camera>/``). Every output carries the input frame's header.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_system_default
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.subscription import Subscription
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Float32, UInt32

from ..inference.runtime import FrameCounters, RollingStats, TransportLosses
from .diagnostics import processed_frame_stats
from .image_conversion import bgr_image_fields, label_image_fields

# rclpy hands a subscription callback the message info (sequence numbers) since Iron.
HAS_MESSAGE_INFO = hasattr(Subscription, "CallbackType")


@dataclass
class PendingFrame:
    camera: "CameraStream"
    message: Any
    received: float  # time.perf_counter() when the callback got it


def scale_camera_info(info: CameraInfo, width: int, height: int, header) -> CameraInfo:
    """camera_info for an image of ``width`` x ``height`` made from the camera's (intrinsics scaled)."""
    scaled = CameraInfo(header=header, width=width, height=height, distortion_model=info.distortion_model,
                        d=list(info.d), r=list(info.r), binning_x=info.binning_x, binning_y=info.binning_y)
    sx = width / info.width if info.width else 1.0
    sy = height / info.height if info.height else 1.0
    k, p = list(info.k), list(info.p)
    for index, factor in ((0, sx), (1, sx), (2, sx), (3, sy), (4, sy), (5, sy)):  # rows 0 and 1 of K
        k[index] *= factor
    for index, factor in ((0, sx), (1, sx), (2, sx), (3, sx), (4, sy), (5, sy), (6, sy), (7, sy)):  # of P
        p[index] *= factor
    scaled.k, scaled.p = k, p
    scaled.roi.x_offset = int(round(info.roi.x_offset * sx))
    scaled.roi.y_offset = int(round(info.roi.y_offset * sy))
    scaled.roi.width = int(round(info.roi.width * sx))
    scaled.roi.height = int(round(info.roi.height * sy))
    scaled.roi.do_rectify = info.roi.do_rectify
    return scaled


@dataclass
class CameraStream:
    """Topics and bookkeeping of one camera (``name`` "" is the single-camera default)."""

    name: str
    counters: FrameCounters = field(default_factory=FrameCounters)
    timings: RollingStats = field(default_factory=lambda: RollingStats(window=100))
    losses: TransportLosses = field(default_factory=lambda: TransportLosses(available=HAS_MESSAGE_INFO))
    last_received: Optional[float] = None
    last_stats: dict = field(default_factory=dict)
    camera_info: Optional[CameraInfo] = None
    input_topic: str = ""
    publishers: dict = field(default_factory=dict)
    subscriptions: list = field(default_factory=list)
    _processed_at_report: int = 0
    _errors_at_report: int = 0
    _report_time: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        return self.name or "camera"

    def output(self, topic: str) -> str:
        return f"~/{self.name}/{topic}" if self.name else f"~/{topic}"

    def input(self, topic: str) -> str:
        return f"{self.name}/{topic}" if self.name else topic

    # -- ROS entities ----------------------------------------------------------------
    def create_publishers(self, node: Node, lifecycle: bool) -> None:
        """Outputs with the system default QoS, overridable by REP 2003 qos_overrides parameters."""
        create = node.create_lifecycle_publisher if lifecycle else node.create_publisher
        for topic, message_type in (("labels", Image), ("overlay", Image), ("confidence", Image),
                                    ("token_count", UInt32), ("latency_ms", Float32),
                                    ("frame_stats", DiagnosticArray), ("camera_info", CameraInfo)):
            self.publishers[topic] = create(
                message_type, self.output(topic), qos_profile_system_default,
                qos_overriding_options=QoSOverridingOptions.with_default_policies())

    def destroy_publishers(self, node: Node, lifecycle: bool) -> None:
        destroy = node.destroy_lifecycle_publisher if lifecycle else node.destroy_publisher
        for publisher in self.publishers.values():
            destroy(publisher)
        self.publishers = {}

    def subscribe(self, node: Node, transport: str, on_frame) -> None:
        """The image (sensor-data QoS, REP 2003 overridable) and the camera_info beside it."""
        image_topic = node.resolve_topic_name(self.input("image"))
        if transport == "compressed":
            # Like image_transport: the transport suffix follows the (remapped) base topic.
            self.input_topic, message_type = image_topic + "/compressed", CompressedImage
        else:
            self.input_topic, message_type = image_topic, Image
        if HAS_MESSAGE_INFO:
            def callback(message, info):
                on_frame(self, message, info)
        else:  # Humble: no message info, so no transport-loss count
            def callback(message):
                on_frame(self, message, None)
        self.subscriptions.append(node.create_subscription(
            message_type, self.input_topic, callback, QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT),
            qos_overriding_options=QoSOverridingOptions.with_default_policies()))
        info_topic = image_topic.rsplit("/", 1)[0] + "/camera_info"
        self.subscriptions.append(node.create_subscription(
            CameraInfo, info_topic, self._on_camera_info, QoSProfile(depth=1)))

    def unsubscribe(self, node: Node) -> None:
        for subscription in self.subscriptions:
            node.destroy_subscription(subscription)
        self.subscriptions = []

    def _on_camera_info(self, message: CameraInfo) -> None:
        self.camera_info = message

    # -- bookkeeping -----------------------------------------------------------------
    def received(self, info: Optional[dict]) -> None:
        self.counters.count("received")
        self.last_received = time.monotonic()
        if info is not None:
            gid = info.get("publisher_gid")
            publisher = bytes(gid["data"]) if isinstance(gid, dict) and "data" in gid else None
            self.losses.record(publisher, info.get("publication_sequence_number"))

    def report_window(self, now: float) -> tuple[float, int]:
        """(output rate since the last report, errors since then); starts the next window."""
        counts = self.counters.snapshot()
        elapsed = max(now - self._report_time, 1e-6)
        rate = (counts["processed"] - self._processed_at_report) / elapsed
        errors = counts["rejected"] + counts["failed"]
        new_errors = errors - self._errors_at_report
        self._processed_at_report, self._errors_at_report, self._report_time = counts["processed"], errors, now
        return rate, new_errors

    def publish_result(self, frame: PendingFrame, bgr: np.ndarray, result, engine, runtime, node_name: str,
                       decode_ms: float, decode_started: float, knob_value: Optional[float]) -> float:
        """Every output of one segmented frame, with its header; returns its receive -> labels latency (ms).

        ``knob_value`` is the value the frame ran with: the engine's may have moved since.
        """
        header, outputs = frame.message.header, self.publishers
        publish_started = time.perf_counter()
        outputs["labels"].publish(Image(header=header, **label_image_fields(result.labels)))
        latency_ms = 1e3 * (time.perf_counter() - frame.received)
        outputs["token_count"].publish(UInt32(data=int(result.stats["tokens_after_merge"])))
        outputs["latency_ms"].publish(Float32(data=float(latency_ms)))
        knob = engine.knob
        outputs["frame_stats"].publish(processed_frame_stats(
            header, node_name, result.stats, latency_ms, result.timings_ms["inference"],
            knob.name if knob else None, knob_value, result.batch_size))
        if result.confidence is not None and outputs["confidence"].get_subscription_count() > 0:
            outputs["confidence"].publish(Image(header=header, **label_image_fields(result.confidence)))
        if runtime.publish_overlay and outputs["overlay"].get_subscription_count() > 0:
            overlay = engine.overlay(bgr, result.labels, runtime.overlay_alpha)
            outputs["overlay"].publish(Image(header=header, **bgr_image_fields(overlay)))
        self.publish_camera_info(header, result.labels)
        published = time.perf_counter()
        self.counters.count("processed")
        self.last_stats = {**result.stats, "network_size": result.network_size, "input_size": bgr.shape[:2]}
        self.timings.add(
            decode=decode_ms, preprocess=result.timings_ms["preprocess"], inference=result.timings_ms["inference"],
            postprocess=result.timings_ms["postprocess"], publish=1e3 * (published - publish_started),
            wait=1e3 * (decode_started - frame.received), total=latency_ms)
        return latency_ms

    def publish_camera_info(self, header, labels: np.ndarray) -> None:
        """The camera's intrinsics at the labels' resolution, with the labels' header (for projection)."""
        info = self.camera_info
        publisher = self.publishers.get("camera_info")
        if info is None or publisher is None or publisher.get_subscription_count() == 0:
            return
        publisher.publish(scale_camera_info(info, labels.shape[1], labels.shape[0], header))
