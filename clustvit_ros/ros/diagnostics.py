"""What the node reports: per-frame stats, and the periodic health status on /diagnostics.

The health logic (OK / WARN / ERROR and why) is plain code over counters and
timings, so it reads in one place: a stalled or dead inference thread, frames
that failed or were rejected since the last report, frames lost in transport,
no input, and a latency budget out of reach.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

STAGES = ("decode", "preprocess", "inference", "postprocess", "publish")
STALE_AFTER_S = 5.0
# Frames waiting while none has been handled for this long: the pipeline is stuck.
STALL_AFTER_S = 10.0
# Above this share of frames lost between camera and node (over the recent window), WARN.
TRANSPORT_LOSS_WARN = 0.03

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


def status(level: int, name: str, message: str, values: dict[str, Any], hardware_id: str = "") -> DiagnosticStatus:
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])


def processed_frame_stats(header, node_name: str, stats: dict, latency_ms: float, inference_ms: float,
                          knob_name: Optional[str], knob_value: Optional[float], batch_size: int) -> DiagnosticArray:
    """~/frame_stats of a frame that was segmented: the same numbers as the scalars, with the input header."""
    values = {"outcome": "processed", "tokens_in": stats["tokens_in"],
              "tokens_after_merge": stats["tokens_after_merge"],
              "merged_fraction": f"{stats['merged_fraction']:.4f}",
              "merge_threshold": "n/a" if knob_value is None or knob_name != "threshold" else f"{knob_value:.4f}",
              "knob": "n/a" if knob_value is None else f"{knob_name}={knob_value:g}",
              "latency_ms": f"{latency_ms:.2f}", "inference_ms": f"{inference_ms:.2f}", "batch_size": batch_size}
    return DiagnosticArray(header=header, status=[status(OK, f"{node_name}: frame", "", values)])


def failed_frame_stats(header, node_name: str, outcome: str, reason: str) -> DiagnosticArray:
    """~/frame_stats of a frame that produced no labels (rejected input, or a failed inference)."""
    return DiagnosticArray(header=header, status=[status(ERROR, f"{node_name}: frame", reason,
                                                          {"outcome": outcome})])


@dataclass
class Health:
    """The inputs of one health judgement (gathered by the node, judged here)."""

    now: float
    new_errors: int
    last_error: str
    worker_alive: bool
    stalled_for: float
    last_received: Optional[float]
    input_topics: str
    transport_loss: Optional[float]  # recent fraction lost between camera and node; None = not known
    target_latency_ms: float
    latency_p95_ms: Optional[float]
    rate_hz: float
    active: bool = True
    model_loaded: bool = True
    publishers: int = 0  # publishers on the input topic (DDS discovery), whatever they deliver
    listening_for: float = 0.0  # seconds since the node subscribed


def _silent_publishers(health: Health) -> str:
    """Why images may not arrive although a camera is on the topic: the most common cause, named."""
    if health.publishers <= 0 or health.listening_for <= STALE_AFTER_S:  # a first frame may be on its way
        return ""
    # Measured on one machine with Fast DDS's defaults: best-effort raw frames above the writer's
    # 512 KiB shared-memory segment (640x480 bgr8 is 900 KiB) never arrive, and no loss is reported.
    return (f" although {health.publishers} publisher(s) are on it: raw frames over ~0.5 MB are lost whole "
            "over best effort; use reliable QoS or compressed transport (README, Large raw images)")


def judge(health: Health) -> tuple[int, str]:
    """(level, message) of the node's status: the most severe problem first."""
    if not health.active:
        return OK, "inactive (lifecycle): not subscribed; model " + ("loaded" if health.model_loaded else "not loaded")
    if not health.worker_alive:
        return ERROR, "inference thread stopped; restarted"
    if health.stalled_for > STALL_AFTER_S:
        return ERROR, f"frames arrive but none was handled for {health.stalled_for:.0f} s"
    if health.new_errors:
        return ERROR, health.last_error
    if health.last_received is None:
        return WARN, f"waiting for images on {health.input_topics}" + _silent_publishers(health)
    if health.now - health.last_received > STALE_AFTER_S:
        return WARN, (f"no images on {health.input_topics} for {health.now - health.last_received:.0f} s"
                      + _silent_publishers(health))
    if health.transport_loss is not None and health.transport_loss > TRANSPORT_LOSS_WARN:
        return WARN, (f"{100 * health.transport_loss:.0f} % of frames lost between camera and node: for large raw "
                      "images use reliable QoS or compressed transport (README)")
    if health.target_latency_ms > 0 and health.latency_p95_ms is not None \
            and health.latency_p95_ms > 1.2 * health.target_latency_ms:
        return WARN, (f"latency p95 {health.latency_p95_ms:.0f} ms over the {health.target_latency_ms:.0f} ms budget "
                      "(knob at its limit)")
    return OK, f"segmenting at {health.rate_hz:.1f} Hz"


def timing_values(timings: dict[str, tuple[float, float]]) -> dict[str, str]:
    """mean and p95 of every stage, as diagnostics key-values."""
    values = {}
    for stage in STAGES + ("wait", "total"):
        mean, p95 = timings.get(stage, (math.nan, math.nan))
        values[f"{stage}_ms_mean"] = f"{mean:.2f}"
        values[f"{stage}_ms_p95"] = f"{p95:.2f}"
    return values


class PipelineReporter:
    """Builds the periodic /diagnostics array from a pipeline's state: one status for the node,
    and one per camera when it serves several."""

    def __init__(self, pipeline, publisher):
        self.pipeline = pipeline
        self.publisher = publisher

    def publish(self, now: float, worker_alive: bool, stalled_for: float) -> None:
        pipeline = self.pipeline
        statuses = []
        overall: Optional[tuple[int, str]] = None
        for camera in pipeline.cameras:
            level, message, values = self._camera_report(camera, now, worker_alive, stalled_for)
            if overall is None or level > overall[0]:
                overall = (level, message)
            statuses.append((camera, level, message, values))
        engine_values = self._engine_values()
        hardware = engine_values.get("device", "")
        array = DiagnosticArray()
        name = f"{pipeline.name}: segmentation"
        if len(pipeline.cameras) == 1:  # one status, as rqt_runtime_monitor users know it
            _, level, message, values = statuses[0]
            array.status.append(status(level, name, message, {**engine_values, **values}, hardware))
        else:  # the node's status (the worst camera's level), then one per camera
            level, message = overall
            cameras = ", ".join(c.name for c in pipeline.cameras)
            array.status.append(status(level, name, message, {**engine_values, "cameras": cameras,
                                                              **pipeline.batching.summary()}, hardware))
            for camera, level, message, values in statuses:
                array.status.append(status(level, f"{pipeline.name}: camera {camera.name}", message, values, hardware))
        array.header.stamp = pipeline.node.get_clock().now().to_msg()
        self.publisher.publish(array)

    def _camera_report(self, camera, now: float, worker_alive: bool, stalled_for: float) -> tuple[int, str, dict]:
        pipeline = self.pipeline
        rate, new_errors = camera.report_window(now)
        counts = camera.counters.snapshot()
        timings = camera.timings.summary()
        health = Health(
            now=now, new_errors=new_errors, last_error=counts["last_error"], worker_alive=worker_alive,
            stalled_for=stalled_for, last_received=camera.last_received, input_topics=camera.input_topic or "input",
            transport_loss=camera.losses.recent_fraction(),
            target_latency_ms=pipeline.runtime.target_latency_ms,
            latency_p95_ms=timings["total"][1] if "total" in timings else None, rate_hz=rate, active=pipeline.active,
            model_loaded=pipeline.engine is not None,
            publishers=pipeline.node.count_publishers(camera.input_topic) if pipeline.active and camera.input_topic
            else 0, listening_for=now - pipeline.listening_since)
        level, message = judge(health)
        stats = camera.last_stats
        values: dict[str, Any] = {
            "input_topic": camera.input_topic or "n/a",
            "input_size": "x".join(map(str, stats.get("input_size", ())[::-1])) or "n/a",
            "inference_size": "x".join(map(str, stats.get("network_size", ())[::-1])) or "n/a",
            "tokens_in": stats.get("tokens_in", "n/a"),
            "tokens_after_merge": stats.get("tokens_after_merge", "n/a"),
            "merged_fraction": f"{stats['merged_fraction']:.3f}" if "merged_fraction" in stats else "n/a",
            **timing_values(timings),
            "output_rate_hz": f"{rate:.2f}",
            "frames_received": counts["received"],
            "frames_processed": counts["processed"],
            "frames_dropped": pipeline.slots.dropped.get(camera.name, 0),
            "frames_rejected": counts["rejected"],
            "frames_failed": counts["failed"],
            "frames_lost_in_transport": camera.losses.lost if camera.losses.available else "n/a",
            "last_error": counts["last_error"] or "none",
        }
        return level, message, values

    def _engine_values(self) -> dict[str, Any]:
        pipeline = self.pipeline
        engine = pipeline.engine
        if engine is None:
            return {"model": "not loaded", "device": pipeline.settings.device}
        info = engine.info()
        knob, value = engine.knob, engine.knob_value
        return {
            "model": info.model_path,
            "device": f"{info.device} ({info.dtype})",
            "precision": f"{info.dtype} ({info.precision_reason})",
            "cpu_threads": pipeline.threads,
            "strategy": engine.strategy.name,
            "strategy_knob": "n/a" if knob is None else f"{knob.name}={value:g}",
            "merge_threshold": f"{value:.3f}" if knob is not None and knob.name == "threshold" else "n/a",
            "target_latency_ms": f"{pipeline.runtime.target_latency_ms:g}",
        }
