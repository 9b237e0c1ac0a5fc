"""Benchmark of the running node (a real process, DDS on loopback).

1. Overhead: frames at a rate the model easily sustains; the node's median
   receive -> labels latency over the model's median inference time (the same
   frames, measured in the same process), and each stage's share.
2. Flood: frames at ``--rate`` Hz (30 by default, faster than the model on a
   CPU) for ``--frames`` frames: latency p95 over the model's median, frames
   dropped, and the node's resident memory growth from frame 200 (a quarter of the
   way in for shorter floods: allocator warm-up is over by then) to the end.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from ..inference.packaged import demo_video_path, packaged_model_path
from .arguments import above_zero, at_least_one, at_least_zero
from .ros_process import (NodeProcess, Probe, diagnostic_values, image_message, node_diagnostics,
                          require_local_ros_environment, wait_for)

INPUT = "/bench/image_raw"


def load_frames(source: str, width: int, height: int, limit: int = 50) -> list[np.ndarray]:
    """The first ``limit`` BGR frames of a video, image folder or image (the node's image_source
    reader), resized to what the benchmark sends."""
    # Imported here, like run()'s ROS messages: the module loads rclpy, which must come after
    # require_local_ros_environment() (loopback-only discovery, own domain).
    from ..ros.image_source import SourceError, open_frames
    try:
        frames, _ = open_frames(source)
        frames = list(itertools.islice(frames, limit))
    except SourceError as exc:
        raise SystemExit(str(exc)) from None
    if not frames:
        raise SystemExit(f"{source}: no frames")
    return [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _frame_values(probe: Probe) -> list[dict]:
    return [diagnostic_values(a.status[0]) for a in probe.received("/clustvit/frame_stats")]


def run(args: argparse.Namespace) -> dict:
    require_local_ros_environment()
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image
    frames = load_frames(args.source, args.width, args.height)
    messages = [image_message(f) for f in frames]
    probe = Probe("clustvit_node_bench")
    probe.listen(DiagnosticArray, "/clustvit/frame_stats")
    probe.listen(DiagnosticArray, "/diagnostics")
    node = NodeProcess("segment_node", {"model_path": args.model or str(packaged_model_path()),
                                        "device": args.device, "publish_overlay": False},
                       {"image": INPUT}, name="bench-node")
    try:
        camera = probe.publisher(Image, INPUT)
        if not wait_for(lambda: camera.get_subscription_count() > 0, 180):
            raise SystemExit("node did not subscribe:\n" + node.log())
        overhead = _overhead(probe, camera, messages, args)
        flood = _flood(probe, camera, messages, node, args)
    finally:
        node.stop()
        probe.close()
    return {"input": f"{args.width}x{args.height} bgr8", **overhead, **flood}


def _latest_status(probe: Probe, wait_s: float = 10.0):
    """The node's newest diagnostics status; waits for one (they come on a timer, so a run that labels its
    frames quickly can end before the first arrives), and says so if none comes."""
    if not wait_for(lambda: bool(node_diagnostics(probe)), wait_s):
        raise SystemExit(f"the node published no diagnostics on /diagnostics within {wait_s:.0f} s")
    return node_diagnostics(probe)[-1]


def _overhead(probe: Probe, camera, messages: list, args: argparse.Namespace) -> dict:
    """One frame at a time, the next only after the previous is out: the node's cost over the model's."""
    for index in range(args.warmup + args.overhead_frames):
        before = len(probe.received("/clustvit/frame_stats"))
        message = messages[index % len(messages)]
        deadline = time.monotonic() + 30
        while len(probe.received("/clustvit/frame_stats")) == before and time.monotonic() < deadline:
            camera.publish(message)
            wait_for(lambda: len(probe.received("/clustvit/frame_stats")) > before, 2.0)
        time.sleep(0.02)  # the node is idle when the next frame arrives
    values = _frame_values(probe)[args.warmup:]
    if not values:
        raise SystemExit(f"the node labelled none of the {args.overhead_frames} measured frames")
    latency = np.array([float(v["latency_ms"]) for v in values])
    model_ms = float(np.median([float(v["inference_ms"]) for v in values]))
    stages = {k: float(v) for k, v in diagnostic_values(_latest_status(probe)).items() if k.endswith("_ms_mean")}
    return {"model_latency_ms_median": model_ms, "node_latency_ms_median": float(np.median(latency)),
            "overhead_ratio": float(np.median(latency)) / model_ms, "stage_ms_mean": stages}


def _flood(probe: Probe, camera, messages: list, node: NodeProcess, args: argparse.Namespace) -> dict:
    """Frames at ``args.rate`` Hz: latency p95 over the model's median, drops, memory growth."""
    probe.clear()
    period = 1.0 / args.rate
    start = time.monotonic()
    rss_start, rss_from = None, min(200, args.frames // 4)
    for index in range(args.frames):
        camera.publish(messages[index % len(messages)])
        if index == rss_from:
            rss_start = rss_mb(node.process.pid)
        delay = start + (index + 1) * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    time.sleep(1.0)
    rss_end = rss_mb(node.process.pid)
    values = _frame_values(probe)
    if not values:
        raise SystemExit(f"the node labelled none of the {args.frames} flood frames:\n" + node.log())
    flood = np.array([float(v["latency_ms"]) for v in values])
    flood_inference = np.array([float(v["inference_ms"]) for v in values])
    time.sleep(1.5)
    counts = diagnostic_values(_latest_status(probe))
    return {
        "flood_rate_hz": args.rate,
        "flood_frames_published": args.frames,
        "flood_frames_processed": int(flood.size),
        "flood_frames_dropped": int(counts["frames_dropped"]),
        "flood_frames_lost_in_transport": counts.get("frames_lost_in_transport"),
        "flood_latency_ms_median": float(np.median(flood)),
        "flood_latency_ms_p95": float(np.percentile(flood, 95)),
        "flood_model_latency_ms_median": float(np.median(flood_inference)),
        "flood_p95_over_model": float(np.percentile(flood, 95)) / float(np.median(flood_inference)),
        "rss_from_frame": rss_from,
        "rss_mb_at_start": rss_start,
        "rss_mb_at_end": rss_end,
        "rss_growth_mb": rss_end - rss_start,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="node_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(demo_video_path()),
                        help="image folder or video (e.g. ../shared/datasets/camvid/val)")
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=at_least_one, default=480)
    parser.add_argument("--height", type=at_least_one, default=360)
    parser.add_argument("--warmup", type=at_least_zero, default=5)
    parser.add_argument("--overhead-frames", type=at_least_one, default=60)
    parser.add_argument("--rate", type=above_zero, default=30.0)
    parser.add_argument("--frames", type=at_least_one, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
