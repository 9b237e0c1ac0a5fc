"""The segmentation pipeline behind both node flavours (plain and lifecycle).

Threads: the executor thread only receives (frames, parameter calls, the
diagnostics timer) and never blocks; one inference thread takes every
camera's newest pending frame, runs frames of one size through the network
as one batch when that measured faster on this device (one by one otherwise),
and publishes. Latency cannot pile up: a frame arriving during inference
replaces the one pending for its camera (counted as dropped).

Stages mirror a lifecycle node: ``configure`` loads the model and creates the
publishers, ``activate`` subscribes and starts the inference thread,
``deactivate`` stops both, ``cleanup`` frees the model.
"""
from __future__ import annotations

import gc
import threading
import time
from collections import defaultdict
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float32, UInt32

from ..inference.devices import resolve_device, set_cpu_threads
from ..inference.engine import SegmentationEngine
from ..inference.packaged import packaged_model_path
from ..inference.runtime import BatchChooser, FrameSlots, LatencyController
from ..model import CheckpointError
from ..model.reduction import strategy_spec
from . import diagnostics
from .camera import HAS_MESSAGE_INFO, CameraStream, PendingFrame
from .image_conversion import FrameError, bgr_image_fields, decode_compressed, decode_image, label_image_fields
from .limits import bounded
from .parameters import RuntimeSettings, StartupError, StartupSettings, declare_runtime, knob_parameter_name


class SegmentationPipeline:
    """Frames in, labels out, for one node and one or more cameras (see the module doc)."""

    def __init__(self, node: Node, settings: StartupSettings, lifecycle: bool = False):
        self.node = node
        self.settings = settings
        self.lifecycle = lifecycle
        self.name = node.get_name()
        self.cameras = [CameraStream(name) for name in settings.cameras] or [CameraStream("")]
        self.slots: FrameSlots[PendingFrame] = FrameSlots()
        self.controller = LatencyController()
        self.batching = BatchChooser()
        self.runtime = RuntimeSettings()
        self.engine: Optional[SegmentationEngine] = None
        self.active = False
        self._worker: Optional[threading.Thread] = None
        self._runtime_declared = False
        self._last_handled = time.monotonic()
        self._busy_since: Optional[float] = None
        self._worker_restarts = 0
        self.threads = set_cpu_threads(settings.num_threads)
        self.diagnostics_pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.timer = node.create_timer(settings.diagnostic_period, self.publish_diagnostics)

    # -- stages ------------------------------------------------------------------------
    def configure(self) -> None:
        self.engine = self._load_engine()
        strategy = self.engine.strategy
        if not self._runtime_declared:
            declare_runtime(self.node, strategy, self.engine.knob_default, self.engine.config.class_names,
                            self.engine.config.palette, self._apply)
            self._runtime_declared = True
        else:  # configured again after a cleanup: the declared parameters are still in force
            names = [n for n in (knob_parameter_name(strategy),) if n] + [
                "target_latency_ms", "publish_overlay", "overlay_alpha", "labels_at_input_resolution",
                "publish_confidence"]
            self._apply({p.name: p.value for p in self.node.get_parameters(names)})
        for camera in self.cameras:
            camera.create_publishers(self.node, self.lifecycle)
        info = self.engine.info()
        self.node.get_logger().info(
            f"model {info.model_path} on {info.device} ({info.dtype}: {info.precision_reason}), "
            f"{self.threads} CPU threads, inference size {self.engine.inference_size}, "
            f"strategy {self.engine.describe_strategy()}")

    def activate(self) -> None:
        self.slots.reopen()
        for camera in self.cameras:
            camera.subscribe(self.node, self.settings.input_transport, self._on_frame)
        self._start_worker()
        self.active = True
        topics = ", ".join(camera.input_topic for camera in self.cameras)
        self.node.get_logger().info(f"listening on {topics} ({self.settings.input_transport})")

    def deactivate(self) -> None:
        self.active = False
        for camera in self.cameras:
            camera.unsubscribe(self.node)
        self._stop_worker()

    def cleanup(self) -> None:
        for camera in self.cameras:
            camera.destroy_publishers(self.node, self.lifecycle)
        if self.engine is not None:
            self.engine.release()
        self.engine = None
        gc.collect()

    def shutdown(self) -> None:
        """From any state: stop what runs, free what is held."""
        if self.active:
            self.deactivate()
        self._stop_worker()
        if self.engine is not None:
            self.cleanup()

    # -- start-up ----------------------------------------------------------------------
    def _load_engine(self) -> SegmentationEngine:
        settings = self.settings
        model_path = settings.model_path or str(packaged_model_path())
        try:
            device = resolve_device(settings.device)
            engine = SegmentationEngine.from_checkpoint(model_path, str(device), precision=settings.precision,
                                                        inference_size=settings.inference_size or None)
        except CheckpointError as exc:
            raise StartupError(f"cannot load model: {exc}") from None
        except (ValueError, FileNotFoundError) as exc:
            raise StartupError(str(exc)) from None
        name = settings.merge_strategy or ("clustvit" if engine.config.clusters else "none")
        try:
            strategy_spec(name)
            engine.use_strategy(name)
        except ValueError as exc:
            raise StartupError(f"merge_strategy: {exc}") from None
        return engine

    def _apply(self, values: dict) -> None:
        """Runtime parameter changes (already validated by descriptors and the on-set callback)."""
        knob_name = knob_parameter_name(self.engine.strategy) if self.engine is not None else None
        if knob_name is not None and knob_name in values:
            # The parameter is the operator's setting; with a latency budget the controller
            # starts from it and moves the effective value.
            self.runtime.knob = values[knob_name]
            self.engine.knob_value = self.runtime.knob
            self.controller.reset()
        if "target_latency_ms" in values:
            self.runtime.target_latency_ms = float(values["target_latency_ms"])
            self.controller.reset()
            if self.runtime.target_latency_ms == 0 and self.runtime.knob is not None and self.engine is not None:
                self.engine.knob_value = self.runtime.knob  # budget off: back to the setting
        for name in ("publish_overlay", "overlay_alpha", "labels_at_input_resolution", "publish_confidence"):
            if name in values:
                setattr(self.runtime, name, values[name])

    # -- frames ------------------------------------------------------------------------
    def _on_frame(self, camera: CameraStream, message, info: Optional[dict]) -> None:
        """Executor thread: count it, keep only the newest per camera; never block."""
        camera.received(info)
        self.slots.put(camera.name, PendingFrame(camera, message, time.perf_counter()))

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._run_worker, name="clustvit-inference", daemon=True)
        self._worker.start()

    def _stop_worker(self) -> None:
        self.slots.close()
        worker = self._worker
        if worker is not None and worker.is_alive() and worker is not threading.current_thread():
            worker.join(timeout=5.0)
        self._worker = None

    def _run_worker(self) -> None:
        """The inference thread: whatever one frame raises is that frame's failure, never the thread's end."""
        while not self.slots.closed:
            pending = self.slots.take_all(timeout=0.2)
            if not pending:
                continue
            self._busy_since = time.monotonic()
            try:
                self._process(list(pending.values()))
            except Exception as exc:  # noqa: BLE001
                if not self.node.context.ok():  # shutting down mid-frame: just stop
                    return
                for frame in pending.values():
                    self._reject(frame, "failed", f"frame failed: {type(exc).__name__}: {exc}")
            finally:
                self._last_handled, self._busy_since = time.monotonic(), None

    def _decode(self, message):
        limit = self.settings.max_input_pixels
        if isinstance(message, CompressedImage):
            return decode_compressed(message.format, message.data, limit)
        return decode_image(message.encoding, message.height, message.width, message.step, message.data,
                            message.is_bigendian, limit)

    def _process(self, frames: list[PendingFrame]) -> None:
        groups: dict[tuple, list] = defaultdict(list)
        for frame in frames:
            started = time.perf_counter()
            try:
                bgr = self._decode(frame.message)
            except Exception as exc:  # noqa: BLE001 - FrameError, or anything a malformed message triggers
                reason = str(exc) if isinstance(exc, FrameError) else f"{type(exc).__name__}: {exc}"
                self._reject(frame, "rejected", f"bad frame: {reason}")
                continue
            decode_ms = 1e3 * (time.perf_counter() - started)
            groups[self.engine.network_shape(*bgr.shape[:2])].append((frame, bgr, decode_ms, started))
        for group in groups.values():
            if self.batching.batched(len(group)):
                self._segment(group)
            else:
                for item in group:
                    self._segment([item])

    def _segment(self, group: list) -> None:
        runtime, engine = self.runtime, self.engine
        started = time.perf_counter()
        try:
            results = engine.segment_batch([bgr for _, bgr, _, _ in group], runtime.labels_at_input_resolution,
                                           bgr=True, confidence=self._confidence_wanted(group))
        except Exception as exc:  # a failing frame (e.g. out of GPU memory) must not stop the node
            for frame, *_ in group:
                self._reject(frame, "failed", f"inference failed: {type(exc).__name__}: {exc}")
            return
        self.batching.record(len(group), len(group) > 1, time.perf_counter() - started)
        for (frame, bgr, decode_ms, decode_started), result in zip(group, results):
            self._publish(frame, bgr, result, decode_ms, decode_started)

    def _confidence_wanted(self, group: list) -> bool:
        return self.runtime.publish_confidence and any(
            frame.camera.publishers["confidence"].get_subscription_count() > 0 for frame, *_ in group)

    def _publish(self, frame: PendingFrame, bgr, result, decode_ms: float, decode_started: float) -> None:
        camera, header, runtime, engine = frame.camera, frame.message.header, self.runtime, self.engine
        publish_started = time.perf_counter()
        outputs = camera.publishers
        outputs["labels"].publish(Image(header=header, **label_image_fields(result.labels)))
        labelled = time.perf_counter()
        latency_ms = 1e3 * (labelled - frame.received)
        outputs["token_count"].publish(UInt32(data=int(result.stats["tokens_after_merge"])))
        outputs["latency_ms"].publish(Float32(data=float(latency_ms)))
        knob = engine.knob
        knob_value = engine.knob_value
        outputs["frame_stats"].publish(diagnostics.processed_frame_stats(
            header, self.name, result.stats, latency_ms, result.timings_ms["inference"],
            knob.name if knob else None, knob_value, result.batch_size))
        if result.confidence is not None and outputs["confidence"].get_subscription_count() > 0:
            outputs["confidence"].publish(Image(header=header, **label_image_fields(result.confidence)))
        if runtime.publish_overlay and outputs["overlay"].get_subscription_count() > 0:
            overlay = engine.overlay(bgr, result.labels, runtime.overlay_alpha)
            outputs["overlay"].publish(Image(header=header, **bgr_image_fields(overlay)))
        camera.publish_camera_info(header, result.labels)
        published = time.perf_counter()
        if runtime.target_latency_ms > 0 and knob is not None:
            engine.knob_value = self.controller.update(knob_value, latency_ms, runtime.target_latency_ms, knob)
        camera.counters.count("processed")
        camera.last_stats = {**result.stats, "network_size": result.network_size, "input_size": bgr.shape[:2]}
        camera.timings.add(
            decode=decode_ms, preprocess=result.timings_ms["preprocess"], inference=result.timings_ms["inference"],
            postprocess=result.timings_ms["postprocess"], publish=1e3 * (published - publish_started),
            wait=1e3 * (decode_started - frame.received), total=latency_ms)

    def _reject(self, frame: PendingFrame, counter: str, reason: str) -> None:
        """Count a frame that produced no labels, log it (throttled) and say so on ~/frame_stats."""
        reason = bounded(reason)  # peers choose these strings: keep logs and diagnostics small
        frame.camera.counters.count(counter, error=reason, now=time.monotonic())
        self.node.get_logger().error(reason, throttle_duration_sec=2.0)
        publisher = frame.camera.publishers.get("frame_stats")
        if publisher is not None:
            publisher.publish(diagnostics.failed_frame_stats(frame.message.header, self.name, counter, reason))

    # -- diagnostics -------------------------------------------------------------------
    def publish_diagnostics(self) -> None:
        now = time.monotonic()
        worker_alive = self._worker is not None and self._worker.is_alive()
        if self.active and not worker_alive and not self.slots.closed:
            self._worker_restarts += 1
            self._start_worker()
        busy_since = self._busy_since
        stalled_for = max(now - busy_since if busy_since is not None else 0.0,
                          now - self._last_handled if self.slots.pending else 0.0)
        statuses = []
        overall: Optional[tuple[int, str]] = None
        for camera in self.cameras:
            level, message, values = self._camera_report(camera, now, worker_alive or not self.active, stalled_for)
            if overall is None or level > overall[0]:
                overall = (level, message)
            statuses.append((camera, level, message, values))
        engine_values = self._engine_values()
        hardware = engine_values.get("device", "")
        array = DiagnosticArray()
        if len(self.cameras) == 1:
            camera, level, message, values = statuses[0]
            array.status.append(diagnostics.status(level, f"{self.name}: segmentation", message,
                                                   {**engine_values, **values}, hardware))
        else:
            level, message = overall
            array.status.append(diagnostics.status(level, f"{self.name}: segmentation", message,
                                                   {**engine_values, "cameras": ", ".join(c.name for c in self.cameras),
                                                    **self.batching.summary()}, hardware))
            for camera, level, message, values in statuses:
                array.status.append(diagnostics.status(level, f"{self.name}: camera {camera.name}", message,
                                                       values, hardware))
        array.header.stamp = self.node.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)

    def _camera_report(self, camera: CameraStream, now: float, worker_alive: bool,
                       stalled_for: float) -> tuple[int, str, dict]:
        rate, new_errors = camera.report_window(now)
        counts = camera.counters.snapshot()
        timings = camera.timings.summary()
        health = diagnostics.Health(
            now=now, new_errors=new_errors, last_error=counts["last_error"], worker_alive=worker_alive,
            stalled_for=stalled_for, last_received=camera.last_received, input_topics=camera.input_topic or "input",
            transport_loss=camera.losses.recent_fraction() if HAS_MESSAGE_INFO else None,
            target_latency_ms=self.runtime.target_latency_ms,
            latency_p95_ms=timings["total"][1] if "total" in timings else None, rate_hz=rate, active=self.active,
            model_loaded=self.engine is not None)
        level, message = diagnostics.judge(health)
        stats = camera.last_stats
        values: dict[str, Any] = {
            "input_topic": camera.input_topic or "n/a",
            "input_size": "x".join(map(str, stats.get("input_size", ())[::-1])) or "n/a",
            "inference_size": "x".join(map(str, stats.get("network_size", ())[::-1])) or "n/a",
            "tokens_in": stats.get("tokens_in", "n/a"),
            "tokens_after_merge": stats.get("tokens_after_merge", "n/a"),
            "merged_fraction": f"{stats['merged_fraction']:.3f}" if "merged_fraction" in stats else "n/a",
            **diagnostics.timing_values(timings),
            "output_rate_hz": f"{rate:.2f}",
            "frames_received": counts["received"],
            "frames_processed": counts["processed"],
            "frames_dropped": self.slots.dropped.get(camera.name, 0),
            "frames_rejected": counts["rejected"],
            "frames_failed": counts["failed"],
            "frames_lost_in_transport": camera.losses.lost if HAS_MESSAGE_INFO else "n/a",
            "last_error": counts["last_error"] or "none",
        }
        return level, message, values

    def _engine_values(self) -> dict[str, Any]:
        engine = self.engine
        if engine is None:
            return {"model": "not loaded", "device": self.settings.device}
        info = engine.info()
        knob, value = engine.knob, engine.knob_value
        return {
            "model": info.model_path,
            "device": f"{info.device} ({info.dtype})",
            "precision": f"{info.dtype} ({info.precision_reason})",
            "cpu_threads": self.threads,
            "strategy": engine.strategy.name,
            "strategy_knob": "n/a" if knob is None else f"{knob.name}={value:g}",
            "merge_threshold": f"{value:.3f}" if knob is not None and knob.name == "threshold" else "n/a",
            "target_latency_ms": f"{self.runtime.target_latency_ms:g}",
        }
