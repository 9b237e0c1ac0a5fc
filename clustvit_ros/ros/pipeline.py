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

import ctypes
import gc
import threading
import time
from collections import defaultdict
from typing import Optional

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage

from ..inference.devices import resolve_device, set_cpu_threads
from ..inference.engine import SegmentationEngine
from ..inference.packaged import packaged_model_path
from ..inference.runtime import BatchChooser, BudgetedKnob, FrameSlots
from ..model import CheckpointError
from ..model.reduction import strategy_spec
from . import diagnostics
from .camera import CameraStream, PendingFrame
from .image_conversion import FrameError, decode_compressed, decode_image
from .limits import bounded
from .parameters import RuntimeSettings, StartupError, StartupSettings, declare_runtime, knob_parameter_name


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    glibc keeps freed memory for reuse (after large frees it also raises its
    mmap threshold), so without the trim a cleaned-up model still counts in the
    process's resident memory.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def load_engine(settings: StartupSettings) -> SegmentationEngine:
    """The model the start-up parameters name, on their device and precision, with its strategy."""
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


def decode(message, max_pixels: int):
    """A received Image or CompressedImage as BGR uint8; FrameError says what is wrong with it."""
    if isinstance(message, CompressedImage):
        return decode_compressed(message.format, message.data, max_pixels)
    return decode_image(message.encoding, message.height, message.width, message.step, message.data,
                        message.is_bigendian, max_pixels)


class SegmentationPipeline:
    """Frames in, labels out, for one node and one or more cameras (see the module doc)."""

    def __init__(self, node: Node, settings: StartupSettings, lifecycle: bool = False):
        self.node = node
        self.settings = settings
        self.lifecycle = lifecycle
        self.name = node.get_name()
        self.cameras = [CameraStream(name) for name in settings.cameras] or [CameraStream("")]
        self.slots: FrameSlots[PendingFrame] = FrameSlots()
        self.knob = BudgetedKnob()  # parameters (executor thread) and the controller (worker) both move it
        self.batching = BatchChooser()
        self.runtime = RuntimeSettings()
        self.engine: Optional[SegmentationEngine] = None
        self.active = False
        self._worker: Optional[threading.Thread] = None
        self._runtime_declared = False
        self._last_handled = time.monotonic()
        self._busy_since: Optional[float] = None
        self.listening_since = time.monotonic()
        self.threads = set_cpu_threads(settings.num_threads)
        self.reporter = diagnostics.PipelineReporter(self, node.create_publisher(DiagnosticArray, "/diagnostics", 10))
        self.timer = node.create_timer(settings.diagnostic_period, self.publish_diagnostics)

    # -- stages ------------------------------------------------------------------------
    def configure(self) -> None:
        self.engine = load_engine(self.settings)
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
        self.active, self.listening_since = True, time.monotonic()
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
        release_freed_memory()

    def shutdown(self) -> None:
        """From any state: stop what runs, free what is held."""
        if self.active:
            self.deactivate()
        self._stop_worker()
        if self.engine is not None:
            self.cleanup()

    def _apply(self, values: dict) -> None:
        """Runtime parameter changes (already validated by descriptors and the on-set callback)."""
        knob_name = knob_parameter_name(self.engine.strategy) if self.engine is not None else None
        if knob_name is not None and knob_name in values:
            # The parameter is the operator's setting; with a latency budget the controller
            # starts from it and moves the effective value.
            self.runtime.knob = values[knob_name]
            self.knob.set(self.engine, self.runtime.knob)
        if "target_latency_ms" in values:
            self.runtime.target_latency_ms = float(values["target_latency_ms"])
            if self.engine is not None:
                self.knob.budget_changed(self.engine, self.runtime.target_latency_ms, self.runtime.knob)
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

    def _process(self, frames: list[PendingFrame]) -> None:
        groups: dict[tuple, list] = defaultdict(list)
        for frame in frames:
            started = time.perf_counter()
            try:
                bgr = decode(frame.message, self.settings.max_input_pixels)
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
        begun = self.knob.begin(engine)  # the knob value this batch runs with, and under which setting
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
            self._publish(frame, bgr, result, decode_ms, decode_started, begun)

    def _confidence_wanted(self, group: list) -> bool:
        return self.runtime.publish_confidence and any(
            frame.camera.publishers["confidence"].get_subscription_count() > 0 for frame, *_ in group)

    def _publish(self, frame: PendingFrame, bgr, result, decode_ms: float, decode_started: float,
                 begun: tuple) -> None:
        latency_ms = frame.camera.publish_result(frame, bgr, result, self.engine, self.runtime, self.name, decode_ms,
                                                 decode_started, knob_value=begun[1])
        self.knob.step(self.engine, begun, latency_ms, self.runtime.target_latency_ms)

    def _reject(self, frame: PendingFrame, counter: str, reason: str) -> None:
        """Count a frame that produced no labels, log it (throttled) and say so on ~/frame_stats."""
        reason = bounded(reason)  # peers choose these strings: keep logs and diagnostics small
        frame.camera.counters.count(counter, error=reason, now=time.monotonic())
        self.node.get_logger().error(reason, throttle_duration_sec=2.0)
        publisher = frame.camera.publishers.get("frame_stats")
        if publisher is not None:
            publisher.publish(diagnostics.failed_frame_stats(frame.message.header, self.name, counter, reason))

    # -- diagnostics -------------------------------------------------------------------
    @property
    def diagnostics_pub(self):
        return self.reporter.publisher

    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def publish_diagnostics(self) -> None:
        """The periodic /diagnostics report; a dead inference thread is restarted here."""
        alive = self.worker_alive()
        if self.active and not alive and not self.slots.closed:
            self._start_worker()
        now = time.monotonic()
        busy_since = self._busy_since
        stalled_for = max(now - busy_since if busy_since is not None else 0.0,
                          now - self._last_handled if self.slots.pending else 0.0)
        self.reporter.publish(now, alive or not self.active, stalled_for)
