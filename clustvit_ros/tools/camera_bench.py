"""Several cameras: one node serving them all (one model) against one node per camera.

Each camera publishes real frames at ``--rate`` Hz for ``--seconds``; reported per
layout and camera count: receive -> labels latency p50 / p95 over every labelled
frame, labelled frames per second and camera, frames dropped (newest-frame
policy), and the nodes' resident memory together.

    python -m clustvit_ros.tools.camera_bench --source ../shared/datasets/camvid/val --cameras 1 2 4
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ..inference.packaged import demo_video_path, packaged_model_path
from .arguments import above_zero, at_least_one, at_least_zero
from .node_bench import load_frames, rss_mb
from .ros_process import NodeProcess, Probe, diagnostic_values, image_message, require_local_ros_environment, wait_for

# The longest a node may take to label every camera once after --warmup-seconds.
WARMUP_LIMIT_S = 20.0
NAMES = ["cam0", "cam1", "cam2", "cam3", "cam4", "cam5", "cam6", "cam7"]


def _start(layout: str, count: int, args: argparse.Namespace) -> list[tuple[NodeProcess, dict]]:
    """The node process(es) and, for each, {camera name: its frame_stats topic}."""
    common = {"model_path": args.model or str(packaged_model_path()), "device": args.device,
              "publish_overlay": False, "num_threads": args.threads}
    names = NAMES[:count]
    if layout == "shared":
        process = NodeProcess("segment_node", {**common, "cameras": names}, {"__node": "bench_shared"},
                              name="cams-shared")
        return [(process, {n: f"/bench_shared/{n}/frame_stats" for n in names})]
    started = []
    for name in names:
        process = NodeProcess("segment_node", common, {"__node": f"bench_{name}", "image": f"/{name}/image"},
                              name=f"cams-{name}")
        started.append((process, {name: f"/bench_{name}/frame_stats"}))
    return started


def measure(layout: str, count: int, args: argparse.Namespace, frames: list) -> dict:
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from sensor_msgs.msg import Image
    probe = Probe(f"camera_bench_{layout}_{count}")
    nodes = _start(layout, count, args)
    try:
        topics = {name: topic for _, mapping in nodes for name, topic in mapping.items()}
        for topic in topics.values():
            probe.listen(DiagnosticArray, topic)
        cameras = {name: probe.publisher(Image, f"/{name}/image") for name in topics}
        if not wait_for(lambda: all(c.get_subscription_count() > 0 for c in cameras.values()), 300):
            raise SystemExit("the node(s) did not subscribe:\n" + "\n".join(p.log() for p, _ in nodes))
        messages = [image_message(f) for f in frames]
        _warm_up(probe, cameras, messages, topics, args)
        probe.clear()
        published = _play(cameras, messages, args.rate, args.seconds)
        time.sleep(1.0)
        rss = sum(rss_mb(p.process.pid) for p, _ in nodes)
        latencies = {name: [float(diagnostic_values(m.status[0])["latency_ms"]) for m in probe.received(topic)
                            if m.status[0].level == DiagnosticStatus.OK] for name, topic in topics.items()}
        unlabelled = {name: sum(m.status[0].level != DiagnosticStatus.OK for m in probe.received(topic))
                      for name, topic in topics.items()}
    finally:
        for process, _ in nodes:
            process.stop()
        probe.close()
    every = np.concatenate([np.asarray(v) for v in latencies.values()]) if any(latencies.values()) else np.zeros(1)
    return {"layout": layout, "cameras": count, "rate_hz_per_camera": args.rate, "seconds": args.seconds,
            "published_per_camera": published, "latency_ms_p50": float(np.percentile(every, 50)),
            "latency_ms_p95": float(np.percentile(every, 95)),
            "labelled_hz_per_camera": {n: len(v) / args.seconds for n, v in latencies.items()},
            "min_labelled_hz": min(len(v) for v in latencies.values()) / args.seconds,
            "unlabelled_per_camera": unlabelled, "rss_mb_total": rss, "processes": len(nodes)}


def _warm_up(probe: Probe, cameras: dict, messages: list, topics: dict, args: argparse.Namespace) -> None:
    """Play frames (not measured) for ``--warmup-seconds`` and until every camera has been labelled once.

    A fixed warm-up alone is not enough on a loaded machine: the first inference can take
    longer than it, and a camera then shows no labels in a short measured window.
    """
    from diagnostic_msgs.msg import DiagnosticStatus

    def labelled(topic: str) -> bool:
        return any(m.status[0].level == DiagnosticStatus.OK for m in probe.received(topic))

    _play(cameras, messages, args.rate, args.warmup_seconds)
    started = time.monotonic()
    while not all(labelled(topic) for topic in topics.values()):
        if time.monotonic() - started > WARMUP_LIMIT_S:
            waiting = [name for name, topic in topics.items() if not labelled(topic)]
            reasons = {m.status[0].message for topic in topics.values() for m in probe.received(topic)
                       if m.status[0].level != DiagnosticStatus.OK}
            raise SystemExit(f"no labels for {', '.join(waiting)} after {WARMUP_LIMIT_S:.0f} s of warm-up "
                             f"(frame failures: {sorted(reasons) or 'none'})")
        _play(cameras, messages, args.rate, 1.0)


def _play(cameras: dict, messages: list, rate: float, seconds: float) -> int:
    """Every camera publishes at ``rate`` Hz for ``seconds``; returns frames per camera.

    The cameras take turns, evenly spread over the period, like free-running cameras
    (and the bench's writers share one Fast DDS participant: its 512 KiB shared-memory
    segment cannot hold two raw frames at the same instant, and the first is lost, which
    starved cam0 in CI; a real multi-camera rig has one driver process per camera or
    configures that segment, README "Large raw images").
    """
    start, index, count = time.monotonic(), 0, len(cameras)
    while time.monotonic() - start < seconds:
        for camera_index, camera in enumerate(cameras.values()):
            delay = start + (index + camera_index / count) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            message = messages[(index + 7 * camera_index) % len(messages)]
            message.header.stamp.sec, message.header.stamp.nanosec = divmod(time.time_ns(), 1_000_000_000)
            camera.publish(message)
        index += 1
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return index


def _camera_count(text: str) -> int:
    count = at_least_one(text)
    if count > len(NAMES):
        raise argparse.ArgumentTypeError(f"{text}: at most {len(NAMES)} cameras")
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="camera_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(demo_video_path()), help="image folder or video")
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=at_least_zero, default=0, help="num_threads of each node (0 = default)")
    parser.add_argument("--width", type=at_least_one, default=480)
    parser.add_argument("--height", type=at_least_one, default=360)
    parser.add_argument("--cameras", type=_camera_count, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layouts", nargs="+", default=["shared", "separate"], choices=("shared", "separate"))
    parser.add_argument("--rate", type=above_zero, default=10.0, help="frames per second and camera")
    parser.add_argument("--seconds", type=above_zero, default=30.0)
    parser.add_argument("--warmup-seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    require_local_ros_environment()
    frames = load_frames(args.source, args.width, args.height)
    rows = [measure(layout, count, args, frames) for count in args.cameras for layout in args.layouts
            if not (layout == "separate" and count == 1)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['cameras']} camera(s), {row['layout']:8s}: latency p50 {row['latency_ms_p50']:7.1f} ms, "
                  f"p95 {row['latency_ms_p95']:7.1f} ms, slowest camera {row['min_labelled_hz']:.2f} Hz, "
                  f"RSS {row['rss_mb_total']:.0f} MB in {row['processes']} process(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
