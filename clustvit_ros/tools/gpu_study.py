"""The GPU study in one call: ClustViT-Ti against ViT-Ti on the same weights, on the robot's GPU.

Arms, interleaved over real frames of the packaged street video (a scene the
model never trained on): {ClustViT-Ti (merging at the default threshold),
ViT-Ti (merging off)} x {fp32, fp16} x {eager, CUDA graphs (ClustViT: one
graph per bucket of the reduced length)} at batch 1, and both models eager at
batch 4; then the node end to end on CUDA (receive -> labels). Prints a
Markdown table and writes it with the raw numbers as JSON.

    python -m clustvit_ros.tools.gpu_study --out gpu_study.json          # on the GPU machine
    python -m clustvit_ros.tools.gpu_study --device cpu --frames 2 --repeats 1   # a dry run anywhere

On the CPU only the eager fp32 arms run (graphs and fp16 are CUDA-only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import torch

from ..inference.cuda_graphs import GraphedClusterMerging
from ..inference.devices import resolve_device
from ..inference.engine import inference_shape
from ..inference.packaged import demo_video_path, packaged_model_path
from ..model import ClusterMerging, NoReduction, load_checkpoint
from ..tools.data import to_tensor
from .unlabelled import read_video


def video_frames(path: Path, count: int, stride: int = 10) -> list[np.ndarray]:
    """Every ``stride``-th RGB frame of a video."""
    capture = cv2.VideoCapture(str(path))
    try:
        frames = read_video(capture, count, stride)[1]
    finally:
        capture.release()
    if not frames:
        raise SystemExit(f"{path}: no frames")
    return frames


def _inputs(frames: list[np.ndarray], model, device, dtype) -> list[torch.Tensor]:
    long_side = max(model.config.input_size)
    tensors = []
    for frame in frames:
        h, w = inference_shape(*frame.shape[:2], long_side)
        image = to_tensor(cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA), model.config.mean,
                          model.config.std)[None]
        height, width = model.padded_size(h, w)
        tensors.append(torch.nn.functional.pad(image, (0, width - w, 0, height - h)).to(device, dtype))
    return tensors


class WholeGraph:
    """A static-shape forward (the plain ViT at batch 1) captured once as one CUDA graph."""

    def __init__(self, model, example: torch.Tensor):
        self.x = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(self.x, NoReduction())
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = model(self.x, NoReduction()).logits

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.graph.replay()
        return self.out


def _arms(model, inputs: list[torch.Tensor], threshold: float, device) -> dict[str, Callable[[int], object]]:
    """name -> run(frame index); batch-4 arms take four frames from the index on."""
    cuda = device.type == "cuda"
    merging = ClusterMerging(threshold)
    arms: dict[str, Callable[[int], object]] = {
        "ClustViT-Ti eager b1": lambda i: model(inputs[i], merging),
        "ViT-Ti eager b1": lambda i: model(inputs[i], NoReduction()),
    }
    if len({tuple(x.shape) for x in inputs}) == 1 and len(inputs) >= 4:
        def batch(i: int) -> torch.Tensor:
            return torch.cat([inputs[(i + j) % len(inputs)] for j in range(4)])
        arms["ClustViT-Ti eager b4"] = lambda i: model(batch(i), merging)
        arms["ViT-Ti eager b4"] = lambda i: model(batch(i), NoReduction())
    if cuda:
        graphed = GraphedClusterMerging(threshold, bucket=64)
        whole = WholeGraph(model, inputs[0])
        arms["ClustViT-Ti graphs b1"] = lambda i: model(inputs[i], graphed)
        arms["ViT-Ti graphs b1"] = lambda i: whole(inputs[i])
    return arms


def _time(device: torch.device, run: Callable[[], object]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def study(model_path: str, device: torch.device, frames: list[np.ndarray], repeats: int, warmup: int,
          precisions: list[str], log: Callable[[str], None]) -> list[dict]:
    rows = []
    for precision in precisions:
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
        model = load_checkpoint(model_path).to(device, dtype)
        threshold = model.config.default_merge_threshold
        inputs = _inputs(frames, model, device, dtype)
        with torch.inference_mode():
            arms = _arms(model, inputs, threshold, device)
            for run in arms.values():
                for index in range(warmup):
                    run(index % len(inputs))
            times: dict[str, list[float]] = {name: [] for name in arms}
            names = list(arms)
            for round_index in range(repeats):
                for index in range(len(inputs)):
                    for name in (names if (round_index + index) % 2 == 0 else names[::-1]):
                        times[name].append(_time(device, lambda: arms[name](index)))
            tokens = [model(x, ClusterMerging(threshold)).stats.tokens_after[0] for x in inputs]
        for name, values in times.items():
            images = 4 if name.endswith("b4") else 1
            median = float(np.median(values))
            rows.append({"arm": name, "precision": precision, "batch": images, "median_ms": 1e3 * median,
                         "frames_per_second": images / median, "tokens_after_merge": float(np.mean(tokens)),
                         "tokens_in": int(inputs[0].shape[-2] * inputs[0].shape[-1] / 256)})
            log(f"{precision} {name:24s} {1e3 * median:8.2f} ms  {images / median:8.1f} frames/s")
    return rows


def node_end_to_end(model_path: str, device: str, frames: list[np.ndarray], count: int) -> Optional[dict]:
    """The node on this device: median receive -> labels latency over ``count`` frames, one at a time."""
    import os
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    from .ros_process import NodeProcess, Probe, diagnostic_values, image_message, wait_for
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image
    probe = Probe("gpu_study_probe")
    probe.listen(DiagnosticArray, "/clustvit/frame_stats")
    # Reliable input (REP 2003 override): best-effort DDS loses frames of this size on loopback.
    node = NodeProcess("segment_node", {"model_path": model_path, "device": device, "publish_overlay": False,
                                        "qos_overrides./gpu_study/image.subscription.reliability": "reliable"},
                       {"image": "/gpu_study/image"}, name="gpu-study")
    try:
        camera = probe.publisher(Image, "/gpu_study/image")
        if not wait_for(lambda: camera.get_subscription_count() > 0, 300):
            return {"error": node.log()[-2000:]}
        messages = [image_message(cv2.cvtColor(f, cv2.COLOR_RGB2BGR)) for f in frames]
        for index in range(count):
            before = len(probe.received("/clustvit/frame_stats"))
            deadline = time.monotonic() + 20
            while len(probe.received("/clustvit/frame_stats")) == before and time.monotonic() < deadline:
                camera.publish(messages[index % len(messages)])
                wait_for(lambda: len(probe.received("/clustvit/frame_stats")) > before, 2.0)
        values = [diagnostic_values(m.status[0]) for m in probe.received("/clustvit/frame_stats")]
        values = values[min(5, len(values) // 2):]  # the first frames warm the model up
        if not values:
            return {"error": "no frame was segmented", "log": node.log()[-2000:]}
        latency = [float(v["latency_ms"]) for v in values]
        inference = [float(v["inference_ms"]) for v in values]
        return {"frames": len(latency), "latency_ms_median": float(np.median(latency)),
                "latency_ms_p95": float(np.percentile(latency, 95)), "inference_ms_median": float(np.median(inference))}
    finally:
        node.stop()
        probe.close()


def table(rows: list[dict]) -> str:
    lines = ["| arm | precision | batch | median ms | frames/s | tokens after merging |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['arm']} | {row['precision']} | {row['batch']} | {row['median_ms']:.2f} | "
                     f"{row['frames_per_second']:.1f} | {row['tokens_after_merge']:.0f} of {row['tokens_in']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_study", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(packaged_model_path()))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--video", default=str(demo_video_path()))
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--node-frames", type=int, default=60, help="0 skips the node")
    parser.add_argument("--out", default="gpu_study.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    frames = video_frames(Path(args.video), args.frames)
    precisions = ["fp32", "fp16"] if device.type == "cuda" else ["fp32"]

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": study(args.model, device, frames, args.repeats, args.warmup,
                                                       precisions, log)}
    if args.node_frames:
        result["node"] = node_end_to_end(args.model, str(device), frames, args.node_frames)
    result["table"] = table(result["rows"])
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(result["table"])
    if result.get("node"):
        print(f"\nnode end to end on {result['device']}: {json.dumps(result['node'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
