"""ROS 2 node: camera images in; labels, overlay, token counts, latency and diagnostics out.

A thin adapter: decoding lives in ``image_conversion``, frames-to-labels in
``engine``, the newest-frame slot and the latency controller in ``runtime``.
Threads: the executor thread only receives (frames, parameter calls, the
diagnostics timer); one inference thread processes the newest pending frame,
so inference never blocks the executor and latency cannot pile up.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType,
                                SetParametersResult)
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float32, UInt32

from .engine import SegmentationEngine, packaged_model_path, resolve_device
from .image_conversion import (FrameError, bgr_image_fields, bounded, decode_compressed, decode_image,
                               label_image_fields)
from .model import CheckpointError, ClusterMerging
from .model.strategies import make_strategy, strategy_names, strategy_spec
from .node_runner import run_node
from .runtime import FrameCounters, LatencyController, LatestSlot, RollingStats

NODE_NAME = "clustvit"
STAGES = ("decode", "preprocess", "inference", "postprocess", "publish")
STALE_AFTER_S = 5.0
# Frames waiting while none has been handled for this long: the pipeline is stuck.
STALL_AFTER_S = 10.0


class StartupError(RuntimeError):
    """The node cannot start (bad model file, bad start-up parameter); the message says why."""


@dataclass
class PendingFrame:
    message: Any
    received: float  # time.perf_counter() when the callback got it


def _descriptor(description: str, kind: int, read_only: bool = False,
                float_range: Optional[tuple[float, float]] = None,
                int_range: Optional[tuple[int, int]] = None, constraints: str = "") -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=description, type=kind, read_only=read_only,
                                     additional_constraints=constraints)
    if float_range is not None:
        descriptor.floating_point_range = [FloatingPointRange(
            from_value=float(float_range[0]), to_value=float(float_range[1]), step=0.0)]
    if int_range is not None:
        descriptor.integer_range = [IntegerRange(from_value=int_range[0], to_value=int_range[1], step=1)]
    return descriptor


class SegmentNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.counters = FrameCounters()
        self.timings = RollingStats(window=100)
        self.controller = LatencyController()
        self.slot: LatestSlot[PendingFrame] = LatestSlot()
        self._declare_startup_parameters()
        self.engine = self._load_engine()
        self._declare_runtime_parameters()
        self._last_stats: dict = {}
        self._last_received = None
        self._last_handled = time.monotonic()  # a frame finished (published, rejected or failed)
        self._busy_since: Optional[float] = None  # the inference thread is on a frame since
        self._diag_state = {"processed": 0, "time": time.monotonic(), "rejected": 0, "failed": 0}

        self.labels_pub = self.create_publisher(Image, "~/labels", QoSProfile(depth=2))
        self.overlay_pub = self.create_publisher(Image, "~/overlay", QoSProfile(depth=2))
        self.tokens_pub = self.create_publisher(UInt32, "~/token_count", 10)
        self.latency_pub = self.create_publisher(Float32, "~/latency_ms", 10)
        self.frame_stats_pub = self.create_publisher(DiagnosticArray, "~/frame_stats", 10)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.qos_depth, reliability=self.qos_reliability,
                         durability=DurabilityPolicy.VOLATILE)
        if self.input_transport == "compressed":
            # Like image_transport: the transport suffix follows the (remapped) base topic.
            self.input_topic = self.resolve_topic_name("image") + "/compressed"
            self.create_subscription(CompressedImage, self.input_topic, self._on_frame, qos)
        else:
            self.input_topic = self.resolve_topic_name("image")
            self.create_subscription(Image, self.input_topic, self._on_frame, qos)
        self.create_timer(self.diagnostic_period, self._publish_diagnostics)

        self._start_worker()
        info = self.engine.info()
        self.get_logger().info(
            f"model {info.model_path} on {info.device} ({info.dtype}), inference size "
            f"{self.engine.inference_size}, strategy {info.strategy}; listening on {self.input_topic} "
            f"({self.input_transport})")

    # -- parameters -----------------------------------------------------------------
    def _declare_startup_parameters(self) -> None:
        string, integer, double, boolean = (ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_INTEGER,
                                            ParameterType.PARAMETER_DOUBLE, ParameterType.PARAMETER_BOOL)
        declare = self.declare_parameter
        declare("model_path", "", _descriptor(
            "ClustViT checkpoint (.safetensors); empty = the packaged default model", string, read_only=True))
        declare("device", "auto", _descriptor(
            "auto (CUDA when available, else CPU), cpu, cuda or cuda:N", string, read_only=True,
            constraints="auto|cpu|cuda|cuda:N"))
        declare("half", False, _descriptor("fp16 inference on CUDA (ignored on the CPU)", boolean, read_only=True))
        declare("input_transport", "raw", _descriptor(
            "raw: sensor_msgs/Image on 'image'; compressed: sensor_msgs/CompressedImage on 'image/compressed'",
            string, read_only=True, constraints="raw|compressed"))
        declare("inference_size", 0, _descriptor(
            "long side (px) frames are scaled to before inference, aspect kept; 0 = the model's own",
            integer, read_only=True, int_range=(0, 4096)))
        declare("qos_reliability", "best_effort", _descriptor(
            "input subscription reliability", string, read_only=True, constraints="best_effort|reliable"))
        declare("qos_depth", 1, _descriptor("input subscription queue depth", integer, read_only=True,
                                            int_range=(1, 100)))
        declare("max_input_pixels", 4096 * 4096, _descriptor(
            "frames with more pixels are rejected (bounded latency and memory); 0 = no limit",
            integer, read_only=True, int_range=(0, 2 ** 31 - 1)))
        declare("diagnostic_period", 1.0, _descriptor("seconds between /diagnostics messages", double,
                                                      read_only=True, float_range=(0.1, 60.0)))
        declare("merge_strategy", "", _descriptor(
            "token reduction: clustvit, none, tome, algm, ailurus, clustr; empty = clustvit when the "
            "model has a cluster module, else none", string, read_only=True,
            constraints="|".join(strategy_names())))

        get = lambda name: self.get_parameter(name).value  # noqa: E731
        self.input_transport = get("input_transport")
        if self.input_transport not in ("raw", "compressed"):
            raise StartupError(f"input_transport {self.input_transport!r}: expected raw or compressed")
        reliability = get("qos_reliability")
        if reliability not in ("best_effort", "reliable"):
            raise StartupError(f"qos_reliability {reliability!r}: expected best_effort or reliable")
        self.qos_reliability = (ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort"
                                else ReliabilityPolicy.RELIABLE)
        self.qos_depth = get("qos_depth")
        self.max_input_pixels = get("max_input_pixels")
        self.diagnostic_period = get("diagnostic_period")
        inference_size = get("inference_size")
        if inference_size and inference_size < 32:
            raise StartupError(f"inference_size {inference_size}: must be 0 (model default) or >= 32")

    def _load_engine(self) -> SegmentationEngine:
        model_path = self.get_parameter("model_path").value or str(packaged_model_path())
        try:
            device = resolve_device(self.get_parameter("device").value)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        half = self.get_parameter("half").value
        if half and device.type != "cuda":
            self.get_logger().warn("half precision needs CUDA; running fp32 on the CPU")
            half = False
        try:
            engine = SegmentationEngine.from_checkpoint(
                model_path, str(device), half=half,
                inference_size=self.get_parameter("inference_size").value or None)
        except (CheckpointError, FileNotFoundError) as exc:
            raise StartupError(f"cannot load model: {exc}") from None
        name = self.get_parameter("merge_strategy").value or (
            "clustvit" if engine.config.clusters else "none")
        try:
            spec = strategy_spec(name)
        except ValueError as exc:
            raise StartupError(f"merge_strategy: {exc}") from None
        if spec.needs_cluster_module and not engine.config.clusters:
            raise StartupError(f"merge_strategy {name!r} needs a model trained with a cluster module; "
                               f"{model_path} has none")
        if name != "clustvit":
            engine.reduction = make_strategy(name)
        self.strategy = spec
        return engine

    def _declare_runtime_parameters(self) -> None:
        double, boolean = ParameterType.PARAMETER_DOUBLE, ParameterType.PARAMETER_BOOL
        runtime = ["target_latency_ms", "publish_overlay", "overlay_alpha", "labels_at_input_resolution"]
        if self.strategy.name == "clustvit":
            self.declare_parameter("merge_threshold", float(self.engine.merge_threshold), _descriptor(
                "a token merges into its most probable cluster c when p(c) >= threshold; "
                "0 merges all, 1 merges none (plain ViT)", double, float_range=(0.0, 1.0)))
            runtime.append("merge_threshold")
        elif self.strategy.knob is not None:
            knob = self.strategy.knob
            kind = ParameterType.PARAMETER_INTEGER if knob.integer else double
            default = int(knob.default) if knob.integer else float(knob.default)
            self.declare_parameter("strategy_knob", default, _descriptor(
                f"{self.strategy.name} {knob.name}: {knob.description} (no-op at {knob.noop:g})", kind,
                float_range=None if knob.integer else (knob.low, knob.high),
                int_range=(int(knob.low), int(knob.high)) if knob.integer else None))
            runtime.append("strategy_knob")
        self.declare_parameter("target_latency_ms", 0.0, _descriptor(
            "latency budget (receive -> labels); > 0 lets the node move the clustvit merge threshold "
            "frame by frame to hold it; 0 = off", double, float_range=(0.0, 10000.0)))
        self.declare_parameter("publish_overlay", True, _descriptor(
            "publish ~/overlay (computed only while someone subscribes)", boolean))
        self.declare_parameter("overlay_alpha", 0.5, _descriptor(
            "palette opacity in ~/overlay", double, float_range=(0.0, 1.0)))
        self.declare_parameter("labels_at_input_resolution", True, _descriptor(
            "~/labels at the input image size (else at the network's inference size)", boolean))
        self._apply({p.name: p.value for p in self.get_parameters(runtime)}, initial=True)
        if hasattr(self, "add_post_set_parameters_callback"):  # Iron and newer
            self.add_on_set_parameters_callback(self._validate_parameters)
            self.add_post_set_parameters_callback(
                lambda params: self._apply({p.name: p.value for p in params}))
        else:  # Humble: apply inside the (single) validating callback
            self.add_on_set_parameters_callback(self._validate_and_apply)

    def _validate_parameters(self, params) -> SetParametersResult:
        """No side effects here: reject with a reason, or accept."""
        for param in params:
            value = param.value
            if isinstance(value, float) and not math.isfinite(value):
                return SetParametersResult(successful=False, reason=f"{param.name} must be a finite number")
            if param.name in ("merge_threshold", "overlay_alpha") and not 0.0 <= value <= 1.0:
                return SetParametersResult(successful=False, reason=f"{param.name} must be in [0, 1]")
            if param.name == "target_latency_ms" and value < 0.0:
                return SetParametersResult(successful=False, reason="target_latency_ms must be >= 0 (0 = off)")
            if param.name == "target_latency_ms" and value > 0.0 and self.strategy.name != "clustvit":
                return SetParametersResult(successful=False, reason="target_latency_ms steers the clustvit "
                                           f"merge threshold; merge_strategy is {self.strategy.name!r}")
            if param.name == "strategy_knob":
                try:
                    self.strategy.knob.validate(value)
                except ValueError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _validate_and_apply(self, params) -> SetParametersResult:
        result = self._validate_parameters(params)
        if result.successful:
            self._apply({p.name: p.value for p in params})
        return result

    def _apply(self, values: dict, initial: bool = False) -> None:
        merging = isinstance(self.engine.reduction, ClusterMerging)
        if "merge_threshold" in values and merging:
            # The parameter is the operator's setting; with a latency budget the
            # controller starts from it and moves the effective value.
            self.merge_threshold = float(values["merge_threshold"])
            self.engine.merge_threshold = self.merge_threshold
            self.controller.reset()
        if "target_latency_ms" in values:
            self.target_latency_ms = float(values["target_latency_ms"])
            self.controller.reset()
            if self.target_latency_ms == 0 and merging and not initial:
                self.engine.merge_threshold = self.merge_threshold  # budget off: back to the setting
        if "strategy_knob" in values:
            setattr(self.engine.reduction, self.strategy.knob.name, self.strategy.knob.validate(values["strategy_knob"]))
        if "publish_overlay" in values:
            self.publish_overlay = bool(values["publish_overlay"])
        if "overlay_alpha" in values:
            self.overlay_alpha = float(values["overlay_alpha"])
        if "labels_at_input_resolution" in values:
            self.labels_at_input_resolution = bool(values["labels_at_input_resolution"])

    # -- frames ---------------------------------------------------------------------
    def _on_frame(self, message) -> None:
        """Executor thread: keep only the newest frame; never block."""
        now = time.perf_counter()
        self.counters.count("received")
        self._last_received = time.monotonic()
        self.slot.put(PendingFrame(message, now))

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._run_worker, name="clustvit-inference", daemon=True)
        self._worker.start()

    def _run_worker(self) -> None:
        """The inference thread: whatever one frame raises is that frame's failure, never the thread's end."""
        while not self.slot.closed:
            frame = self.slot.take(timeout=0.2)
            if frame is None:
                continue
            self._busy_since = time.monotonic()
            try:
                self._process(frame)
            except Exception as exc:  # noqa: BLE001
                if not self.context.ok():  # shutting down mid-frame: just stop
                    return
                self._reject("failed", f"frame failed: {type(exc).__name__}: {exc}", frame.message.header)
            finally:
                self._last_handled, self._busy_since = time.monotonic(), None

    def _decode(self, message):
        if isinstance(message, CompressedImage):
            return decode_compressed(message.format, message.data, self.max_input_pixels)
        return decode_image(message.encoding, message.height, message.width, message.step, message.data,
                            message.is_bigendian, self.max_input_pixels)

    def _process(self, frame: PendingFrame) -> None:
        started = time.perf_counter()
        header = frame.message.header
        try:
            bgr = self._decode(frame.message)
        except Exception as exc:  # noqa: BLE001 - FrameError, or anything a malformed message triggers
            reason = str(exc) if isinstance(exc, FrameError) else f"{type(exc).__name__}: {exc}"
            self._reject("rejected", f"bad frame: {reason}", header)
            return
        decoded = time.perf_counter()
        try:
            result = self.engine.segment(bgr, labels_at_input_resolution=self.labels_at_input_resolution,
                                         bgr=True)
        except Exception as exc:  # a failing frame (e.g. out of GPU memory) must not kill the node
            self._reject("failed", f"inference failed: {type(exc).__name__}: {exc}", header)
            return
        segmented = time.perf_counter()

        self.labels_pub.publish(Image(header=header, **label_image_fields(result.labels)))
        labelled = time.perf_counter()
        latency_ms = 1e3 * (labelled - frame.received)
        self.tokens_pub.publish(UInt32(data=int(result.stats["tokens_after_merge"])))
        self.latency_pub.publish(Float32(data=float(latency_ms)))
        threshold = self.engine.merge_threshold
        self.frame_stats_pub.publish(self._frame_stats(header, result, latency_ms, threshold))
        if self.publish_overlay and self.overlay_pub.get_subscription_count() > 0:
            overlay = self.engine.overlay(bgr, result.labels, self.overlay_alpha)
            self.overlay_pub.publish(Image(header=header, **bgr_image_fields(overlay)))
        published = time.perf_counter()

        if self.target_latency_ms > 0 and threshold is not None:
            self.engine.merge_threshold = self.controller.update(threshold, latency_ms, self.target_latency_ms)
        self.counters.count("processed")
        self._last_stats = {**result.stats, "network_size": result.network_size,
                            "input_size": bgr.shape[:2]}
        self.timings.add(
            decode=1e3 * (decoded - started), preprocess=result.timings_ms["preprocess"],
            inference=result.timings_ms["inference"], postprocess=result.timings_ms["postprocess"],
            publish=1e3 * (published - segmented), wait=1e3 * (started - frame.received), total=latency_ms)

    def _reject(self, counter: str, reason: str, header=None) -> None:
        """Count a frame that produced no labels, log it (throttled) and say so on ~/frame_stats."""
        reason = bounded(reason)  # peers choose these strings: keep logs and diagnostics small
        self.counters.count(counter, error=reason, now=time.monotonic())
        self.get_logger().error(reason, throttle_duration_sec=2.0)
        if header is not None:
            status = DiagnosticStatus(level=DiagnosticStatus.ERROR, name=f"{NODE_NAME}: frame", message=reason,
                                      values=[KeyValue(key="outcome", value=counter)])
            self.frame_stats_pub.publish(DiagnosticArray(header=header, status=[status]))

    @staticmethod
    def _frame_stats(header, result, latency_ms: float, threshold: Optional[float]) -> DiagnosticArray:
        stats = result.stats
        values = {"tokens_in": stats["tokens_in"], "tokens_after_merge": stats["tokens_after_merge"],
                  "merged_fraction": f"{stats['merged_fraction']:.4f}",
                  "merge_threshold": "n/a" if threshold is None else f"{threshold:.4f}",
                  "latency_ms": f"{latency_ms:.2f}", "inference_ms": f"{result.timings_ms['inference']:.2f}"}
        status = DiagnosticStatus(level=DiagnosticStatus.OK, name=f"{NODE_NAME}: frame", message="",
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        return DiagnosticArray(header=header, status=[status])

    # -- diagnostics ----------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        counts = self.counters.snapshot()
        state = self._diag_state
        elapsed = max(now - state["time"], 1e-6)
        rate = (counts["processed"] - state["processed"]) / elapsed
        new_errors = (counts["rejected"] - state["rejected"]) + (counts["failed"] - state["failed"])
        self._diag_state = {"processed": counts["processed"], "time": now, "rejected": counts["rejected"],
                            "failed": counts["failed"]}
        timings = self.timings.summary()
        stats = self._last_stats

        level, message = DiagnosticStatus.OK, ""
        busy_since = self._busy_since
        stalled_for = max(now - busy_since if busy_since is not None else 0.0,
                          now - self._last_handled if self.slot.pending else 0.0)
        if not self._worker.is_alive() and not self.slot.closed:
            level, message = DiagnosticStatus.ERROR, "inference thread stopped; restarted"
            self._start_worker()
        elif stalled_for > STALL_AFTER_S:
            level = DiagnosticStatus.ERROR
            message = f"frames arrive but none was handled for {stalled_for:.0f} s"
        elif new_errors:
            level, message = DiagnosticStatus.ERROR, counts["last_error"]
        elif self._last_received is None:
            level, message = DiagnosticStatus.WARN, f"waiting for images on {self.input_topic}"
        elif now - self._last_received > STALE_AFTER_S:
            level = DiagnosticStatus.WARN
            message = f"no images on {self.input_topic} for {now - self._last_received:.0f} s"
        elif self.target_latency_ms > 0 and "total" in timings and timings["total"][1] > 1.2 * self.target_latency_ms:
            level = DiagnosticStatus.WARN
            message = (f"latency p95 {timings['total'][1]:.0f} ms over the {self.target_latency_ms:.0f} ms budget "
                       "(merge threshold at its limit)")
        else:
            message = f"segmenting at {rate:.1f} Hz"

        info = self.engine.info()
        values: dict[str, Any] = {
            "model": info.model_path,
            "device": f"{info.device} ({info.dtype})",
            "strategy": info.strategy.get("strategy", ""),
            "strategy_knob": ", ".join(f"{k}={v}" for k, v in info.strategy.items() if k not in ("strategy", "oracle"))
            or "n/a",
            "input_size": "x".join(map(str, stats.get("input_size", ())[::-1])) or "n/a",
            "inference_size": "x".join(map(str, stats.get("network_size", ())[::-1])) or "n/a",
            "tokens_in": stats.get("tokens_in", "n/a"),
            "tokens_after_merge": stats.get("tokens_after_merge", "n/a"),
            "merged_fraction": f"{stats['merged_fraction']:.3f}" if "merged_fraction" in stats else "n/a",
            "merge_threshold": ("n/a" if self.engine.merge_threshold is None
                                else f"{self.engine.merge_threshold:.3f}"),
            "target_latency_ms": f"{self.target_latency_ms:g}",
        }
        for stage in STAGES + ("wait", "total"):
            mean, p95 = timings.get(stage, (math.nan, math.nan))
            values[f"{stage}_ms_mean"] = f"{mean:.2f}"
            values[f"{stage}_ms_p95"] = f"{p95:.2f}"
        values.update({
            "output_rate_hz": f"{rate:.2f}",
            "frames_received": counts["received"],
            "frames_processed": counts["processed"],
            "frames_dropped": self.slot.dropped,
            "frames_rejected": counts["rejected"],
            "frames_failed": counts["failed"],
            "last_error": counts["last_error"] or "none",
        })
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: segmentation", message=message,
                                  hardware_id=info.device,
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)

    def destroy_node(self) -> None:
        # Also called on a node whose construction failed half-way: nothing may be assumed.
        slot = getattr(self, "slot", None)
        if slot is not None:
            slot.close()
        worker = getattr(self, "_worker", None)
        if worker is not None and worker.is_alive():
            worker.join(timeout=5.0)
        super().destroy_node()


def main(args=None) -> int:
    return run_node(SegmentNode, NODE_NAME, (StartupError,), args)


if __name__ == "__main__":
    sys.exit(main())
