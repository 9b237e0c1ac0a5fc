"""The main demo: the segmentation node on a real street video, with the packaged model.

Starts ``image_source`` (the video as a 10 Hz camera) and ``segment_node`` as
separate processes, as ``ros2 launch clustvit_ros demo.launch.py`` would, then
prints tokens and latency per frame and saves a few overlay frames as PNG.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from ..inference.packaged import demo_video_path, packaged_model_path
from .ros_process import (NodeProcess, Probe, diagnostic_values, node_diagnostics, require_local_ros_environment,
                          wait_for)

DEMO_VIDEO = demo_video_path()


# Time for the node's publishers to match the viewer after the viewer has seen them.
DISCOVERY_SETTLE_S = 1.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clustvit-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=str(DEMO_VIDEO), help="video, image folder or image")
    parser.add_argument("--model", default="", help="checkpoint (default: the packaged model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rate", type=float, default=10.0, help="camera rate (Hz)")
    parser.add_argument("--frames", type=int, default=100, help="frames to play")
    parser.add_argument("--save-every", type=int, default=20, help="save every N-th overlay")
    parser.add_argument("--out", default="demo_output", help="folder for the overlay PNGs")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    require_local_ros_environment()
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(packaged_model_path())
    print(f"demo: model {model}\ndemo: video {args.video} at {args.rate:g} Hz, {args.frames} frames", flush=True)

    probe = Probe("clustvit_demo_viewer")
    probe.listen(Image, "/clustvit/overlay")
    probe.listen(DiagnosticArray, "/clustvit/frame_stats")
    probe.listen(DiagnosticArray, "/diagnostics")
    node = NodeProcess("segment_node", {"model_path": model, "device": args.device},
                       {"image": "/camera/image_raw"}, name="demo-node")
    camera = None
    try:
        if not wait_for(lambda: node.process.poll() is not None or "listening on" in node.log(), 180):
            raise RuntimeError("the segmentation node did not start in time")
        if node.process.poll() is not None:
            print(node.log(), file=sys.stderr)
            return 1
        print("demo: " + [line for line in node.log().splitlines() if "listening on" in line][-1].split("] ")[-1])
        # Start the camera only once the viewer has discovered the node's outputs, or the
        # first frames' stats would be published before anyone listens.
        wait_for(lambda: all(probe.node.count_publishers(topic) > 0
                             for topic in ("/clustvit/frame_stats", "/clustvit/overlay")), 30)
        # Discovery runs each way on its own: the viewer seeing the node's publishers does not
        # mean those publishers have matched the viewer yet (CI once lost the first frame's stats,
        # and a loaded machine lost one after a fixed wait). A /diagnostics report from the node
        # (once a second) shows its writers reach the viewer; the settle covers the others.
        wait_for(lambda: bool(node_diagnostics(probe)), 30)
        time.sleep(DISCOVERY_SETTLE_S)
        camera = NodeProcess("image_source", {"source": args.video, "rate": args.rate, "loop": True,
                                              "max_frames": args.frames, "wait_for_subscribers": True},
                             {"image": "/camera/image_raw"}, name="demo-camera")
        return _watch(probe, node, camera, args, out)
    finally:
        for process in (camera, node):
            if process is not None:
                process.stop()
        probe.close()


def _watch(probe: Probe, node: NodeProcess, camera: NodeProcess, args, out: Path) -> int:
    printed, saved, last_progress = 0, [], time.monotonic()
    latencies, tokens = [], []
    while time.monotonic() - last_progress < 10.0:  # stop once frames stop coming
        stats = probe.received("/clustvit/frame_stats")
        for array in stats[printed:]:
            values = diagnostic_values(array.status[0])
            printed += 1
            last_progress = time.monotonic()
            latencies.append(float(values["latency_ms"]))
            tokens.append(int(values["tokens_after_merge"]))
            merged = 100 * float(values["merged_fraction"])
            print(f"frame {printed:3d}  tokens {values['tokens_after_merge']:>3}/{values['tokens_in']} "
                  f"(merged {merged:4.1f} %)  latency {float(values['latency_ms']):6.1f} ms"
                  f"  (inference {float(values['inference_ms']):6.1f} ms)", flush=True)
        overlays = probe.received("/clustvit/overlay")
        if overlays and len(saved) < printed // args.save_every + 1:
            message = overlays[-1]
            image = np.frombuffer(message.data, np.uint8).reshape(message.height, message.width, 3)
            path = out / f"overlay_{len(saved):02d}.png"
            cv2.imwrite(str(path), image)
            saved.append(path)
        if node.process.poll() is not None:
            print(node.log(), file=sys.stderr)
            return 1
        time.sleep(0.05)
    if not latencies:
        print("demo: no frames were segmented", file=sys.stderr)
        print(node.log(), file=sys.stderr)
        return 1
    diagnostics = node_diagnostics(probe)
    tokens_in = diagnostic_values(probe.received("/clustvit/frame_stats")[-1].status[0])["tokens_in"]
    print(f"\ndemo: {len(latencies)} frames segmented; median latency {np.median(latencies):.1f} ms, "
          f"median tokens {np.median(tokens):.0f}/{tokens_in}")
    if diagnostics:
        values = diagnostic_values(diagnostics[-1])
        print(f"demo: diagnostics: {diagnostics[-1].message}; received {values['frames_received']}, processed "
              f"{values['frames_processed']}, dropped {values['frames_dropped']}, rejected {values['frames_rejected']}")
    print("demo: overlays saved: " + ", ".join(str(p) for p in saved))
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
