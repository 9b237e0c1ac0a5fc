"""The engine end to end (``SegmentationEngine.segment``: pre-processing, network, labels at the
camera's size), batch 1: the strategy at its knob against merging off on the same weights,
interleaved, on labelled frames (e.g. of a drive the model did not train on); then the labels of
another precision against fp32 (agreement) on a few of them.

    python -m clustvit_ros.tools.engine_bench --model runs/fold_0006R0.safetensors \\
        --data ../shared/datasets/camvid --split train,val --include '0006R0_*' --knob 0.3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from ..inference.engine import SegmentationEngine
from ..inference.packaged import packaged_model_path
from .arguments import add_frame_selection, at_least_one
from .data import open_dataset


def _timed(engine: SegmentationEngine, image: np.ndarray) -> tuple[np.ndarray, float]:
    """The frame's labels and the milliseconds ``segment`` took."""
    start = time.perf_counter()
    labels = engine.segment(image).labels
    return labels, 1000.0 * (time.perf_counter() - start)


def end_to_end(engine: SegmentationEngine, images: list[np.ndarray], knob: float, rounds: int) -> dict:
    """Median and p95 of the strategy at ``knob`` and of merging off, interleaved frame by frame."""
    if engine.knob is None:
        raise ValueError("the model's strategy has no knob to compare against merging off")
    off = engine.knob.noop  # the plain ViT on the same weights
    times: dict[str, list[float]] = {"merged": [], "off": []}
    for image in images[:2]:  # warm-up
        for value in (knob, off):
            engine.knob_value = value
            engine.segment(image)
    for _ in range(rounds):
        for image in images:
            for arm, value in (("merged", knob), ("off", off)):
                engine.knob_value = value
                times[arm].append(_timed(engine, image)[1])
    median = {arm: float(np.median(values)) for arm, values in times.items()}
    return {"knob": knob, "knob_off": off, "frames": len(images), "rounds": rounds,
            "median_ms": median, "p95_ms": {arm: float(np.percentile(v, 95)) for arm, v in times.items()},
            "end_to_end_speedup": median["off"] / median["merged"]}


def label_agreement(reference: SegmentationEngine, other: SegmentationEngine, images: list[np.ndarray],
                    knob: float) -> dict:
    """Share of pixels whose label ``other`` gives as ``reference`` does (merging decided in each)."""
    same = total = 0
    times: dict[str, list[float]] = {"reference": [], "other": []}
    for engine in (reference, other):
        engine.knob_value = knob
    for image in images:
        expected, reference_ms = _timed(reference, image)
        labels, other_ms = _timed(other, image)
        times["reference"].append(reference_ms)
        times["other"].append(other_ms)
        same += int((labels == expected).sum())
        total += expected.size
    return {"precision": other.precision.name, "label_agreement": same / max(total, 1), "frames": len(images),
            "median_ms_fp32": float(np.median(times["reference"])),
            "median_ms_other": float(np.median(times["other"]))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clustvit_ros.tools.engine_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    parser.add_argument("--data", required=True)
    add_frame_selection(parser, "val")
    parser.add_argument("--knob", type=float, default=None, help="the strategy's knob (default: the model's)")
    parser.add_argument("--frames", type=at_least_one, default=20, help="frames, spread evenly over the selection")
    parser.add_argument("--rounds", type=at_least_one, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's choice)")
    parser.add_argument("--compare-precision", default="bf16", help="precision checked against fp32 ('' = skip)")
    parser.add_argument("--agreement-frames", type=at_least_one, default=6)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        model = args.model or str(packaged_model_path())
        data = open_dataset(args.data, args.split, include=args.include, exclude=args.exclude,
                            frame_list=args.frame_list)
        frames = data.spread(args.frames)
        images = [frames.load(index)[0] for index in range(len(frames))]
        engine = SegmentationEngine.from_checkpoint(model, device="cpu", precision="fp32")
        knob = engine.knob_value if args.knob is None else args.knob
        report = {"model": model, "threads": torch.get_num_threads(), **end_to_end(engine, images, knob, args.rounds)}
        if args.compare_precision:
            other = SegmentationEngine.from_checkpoint(model, device="cpu", precision=args.compare_precision)
            report["precision_check"] = label_agreement(engine, other, images[:args.agreement_frames], knob)
    except (ValueError, FileNotFoundError) as exc:
        print(f"engine_bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
