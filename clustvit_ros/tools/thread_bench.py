"""CPU threads against a busy neighbour: the engine's end-to-end latency, quiet and beside busy processes.

A robot runs other nodes beside this one. With every core a torch thread, one
busy process makes the threads wait for each other (a synchronised kernel is
as slow as its slowest thread), and the tail latency grows far beyond the
median. For each thread count this measures ``SegmentationEngine.segment`` on
real frames, quiet and with ``--busy`` processes spinning beside it, in
alternating blocks so that machine drift spreads evenly.

    python -m clustvit_ros.tools.thread_bench --data ../shared/datasets/camvid --include '0006R0_*'
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from ..inference.engine import SegmentationEngine
from ..inference.packaged import packaged_model_path
from .arguments import add_frame_selection, at_least_one
from .data import open_dataset

BUSY_LOOP = "while True: pass"


def _busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


def measure(engine: SegmentationEngine, frames: list[np.ndarray], threads: list[int], busy: int,
            rounds: int) -> dict:
    """Latency (ms) per (threads, neighbours) over ``rounds`` alternating blocks of every frame."""
    times: dict[tuple[int, int], list[float]] = {(t, b): [] for t in threads for b in (0, busy)}
    for _ in range(rounds):
        for count in threads:
            torch.set_num_threads(count)
            for neighbours in (0, busy):
                spinning = _busy(neighbours)
                try:
                    time.sleep(0.2)  # let the neighbours start spinning
                    engine.segment(frames[0])  # one untimed frame after the switch
                    for frame in frames:
                        start = time.perf_counter()
                        engine.segment(frame)
                        times[(count, neighbours)].append(1e3 * (time.perf_counter() - start))
                finally:
                    _stop(spinning)
    quiet = float(np.median(times[(max(threads), 0)]))
    rows = []
    for (count, neighbours), values in times.items():
        rows.append({"threads": count, "busy_processes": neighbours, "median_ms": float(np.median(values)),
                     "p95_ms": float(np.percentile(values, 95)), "frames": len(values),
                     "p95_over_quiet_median_at_default_threads": float(np.percentile(values, 95)) / quiet})
    return {"quiet_median_ms_at_default_threads": quiet, "cpu_count": _cores(), "rows": rows}


def _cores() -> int:
    import os
    return os.cpu_count() or 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="thread_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--data", required=True)
    add_frame_selection(parser, "train,val")
    parser.add_argument("--limit", type=at_least_one, default=15,
                        help="frames per block, spread evenly over the selection")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, _cores()])
    parser.add_argument("--busy", type=int, default=1, help="busy processes beside the engine")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)
    try:
        engine = SegmentationEngine.from_checkpoint(args.model or str(packaged_model_path()), "cpu",
                                                    precision=args.precision)
        data = open_dataset(args.data, args.split, include=args.include, exclude=args.exclude,
                            frame_list=args.frame_list).spread(args.limit)
        frames = [data.load(i)[0] for i in range(len(data))]
    except (ValueError, FileNotFoundError) as exc:  # a bad model file or dataset: one line, no traceback
        print(f"thread_bench: error: {exc}", file=sys.stderr)
        return 2
    result = measure(engine, frames, sorted(set(args.threads)), args.busy, args.rounds)
    result.update({"model": engine.model_path, "precision": engine.precision.name, "frames_per_block": len(frames)})
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
