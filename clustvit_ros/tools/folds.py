"""Leave-one-drive-out results: per-fold and mean figures, and the default threshold they choose.

Each fold's ``clustvit bench --sweep-threshold --json`` output (measured on the drive the fold
did not train on) holds one row per threshold. The default threshold of a model trained on
every drive is chosen here, from held-out drives only: the most merging (lowest threshold)
whose mean held-out mIoU stays within ``max_cost`` of merging off (threshold 1).

    python -m clustvit_ros.tools.folds runs/fold_0006R0_sweep.json runs/fold_0001TP_sweep.json ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def read_sweep(path: str | Path) -> dict[float, dict]:
    """Threshold -> sweep row of one bench JSON file (errors name the file)."""
    try:
        rows = json.loads(Path(path).read_text())["sweep"]
        return {float(row["merge_threshold"]): row for row in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a `clustvit bench --sweep-threshold --json` result ({exc})") from None


def mean_over_folds(sweeps: Sequence[dict[float, dict]]) -> list[dict]:
    """Rows at the thresholds every fold measured: mean and per-fold mIoU, merged fraction, speed-ups."""
    thresholds = sorted(set.intersection(*(set(sweep) for sweep in sweeps)))
    rows = []
    for threshold in thresholds:
        measured = [sweep[threshold] for sweep in sweeps]
        rows.append({
            "merge_threshold": threshold,
            "miou": float(np.mean([row["miou"] for row in measured])),
            "miou_per_fold": [row["miou"] for row in measured],
            "merged_fraction": float(np.mean([row["merged_fraction"] for row in measured])),
            # GFLOPs against each fold's own merging-off row (the plain ViT on the same weights)
            "gflops_ratio": float(np.mean([sweep[max(sweep)]["gflops"] / row["gflops"]
                                           for sweep, row in zip(sweeps, measured)])),
            "latency_ratio": float(np.mean([row["latency_ratio"] for row in measured])),
        })
    return rows


def choose_threshold(rows: Sequence[dict], max_cost: float = 0.5) -> Optional[float]:
    """The lowest threshold whose mean held-out mIoU is at most ``max_cost`` below merging off."""
    off = [row for row in rows if row["merge_threshold"] >= 1.0]
    if not off:
        raise ValueError("the sweeps need the merging-off point (threshold 1)")
    floor = off[0]["miou"] - max_cost
    accepted = [row["merge_threshold"] for row in rows if row["miou"] >= floor and row["merge_threshold"] < 1.0]
    return min(accepted) if accepted else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clustvit_ros.tools.folds", description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="+", help="one bench --sweep-threshold --json file per held-out drive")
    parser.add_argument("--max-cost", type=float, default=0.5, help="mIoU the default may lose to merging off")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        rows = mean_over_folds([read_sweep(path) for path in args.sweeps])
        chosen = choose_threshold(rows, args.max_cost)
    except ValueError as exc:
        print(f"folds: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"held_out_drive_sweep": rows, "chosen_threshold": chosen, "max_cost_miou": args.max_cost,
                          "held_out_sweep_files": list(args.sweeps)}, indent=1))
        return 0
    print(f"{'threshold':>9} {'mIoU':>6} {'merged':>6} {'GFLOPs x':>8} {'latency x':>9}  per fold")
    for row in rows:
        folds = " ".join(f"{value:5.2f}" for value in row["miou_per_fold"])
        print(f"{row['merge_threshold']:9.2f} {row['miou']:6.2f} {row['merged_fraction']:6.3f} "
              f"{row['gflops_ratio']:8.2f} {row['latency_ratio']:9.2f}  {folds}")
    print(f"chosen default threshold (<= {args.max_cost} mIoU below merging off): {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
