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


def _status(level: int, name: str, message: str, values: dict[str, Any], hardware_id: str = "") -> DiagnosticStatus:
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
    return DiagnosticArray(header=header, status=[_status(OK, f"{node_name}: frame", "", values)])


def failed_frame_stats(header, node_name: str, outcome: str, reason: str) -> DiagnosticArray:
    """~/frame_stats of a frame that produced no labels (rejected input, or a failed inference)."""
    return DiagnosticArray(header=header, status=[_status(ERROR, f"{node_name}: frame", reason,
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
        return WARN, f"waiting for images on {health.input_topics}"
    if health.now - health.last_received > STALE_AFTER_S:
        return WARN, f"no images on {health.input_topics} for {health.now - health.last_received:.0f} s"
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


def status(level: int, name: str, message: str, values: dict[str, Any], hardware_id: str) -> DiagnosticStatus:
    return _status(level, name, message, values, hardware_id)
