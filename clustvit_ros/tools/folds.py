"""Leave-one-drive-out results: per-fold and mean figures, and the default threshold they choose.

Each fold's ``clustvit bench --sweep-threshold --json`` output (measured on the drive the fold
did not train on) holds one row per threshold. The default threshold of a model trained on
every drive is chosen here, from held-out drives only: the most merging (lowest threshold)
whose mean held-out mIoU stays within ``max_cost`` of merging off (threshold 1).

Sweeps measured with per-cluster floors (``bench --cluster-floors``; the file records them) are
grouped by their floors, one sweep per fold in each group: every group chooses its threshold by
that rule, and the group whose choice merges the most (mean merged fraction) wins. Floors only
raise the threshold, so all groups share one merging-off point.

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
    return read_sweep_record(path)[0]


def read_sweep_record(path: str | Path) -> tuple[dict[float, dict], tuple[float, ...], Optional[dict]]:
    """(threshold -> sweep row, the per-cluster floors it was measured with (() for none), the
    frames it measured: bench's ``frames``, None for files written before bench recorded it)."""
    try:
        result = json.loads(Path(path).read_text())
        rows = {float(row["merge_threshold"]): row for row in result["sweep"]}
        floors = tuple(float(v) for v in result.get("cluster_floors") or ())
        return rows, floors, result.get("frames")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
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


def choose_setting(paths: Sequence[str | Path], max_cost: float = 0.5) -> dict:
    """Group the sweeps by floors, choose each group's threshold, keep the group that merges the most.

    Returns the winner's ``cluster_floors``, ``chosen_threshold`` (None: nothing within the cost)
    and ``rows``, with every group's ``candidates`` (floors, threshold, merged fraction, mIoU) and
    each file's ``held_out_frames`` (None where bench did not record them).
    """
    groups: dict[tuple[float, ...], list[dict[float, dict]]] = {}
    frames = []
    for path in paths:
        rows, floors, selection = read_sweep_record(path)
        groups.setdefault(floors, []).append(rows)
        frames.append(selection)
    counts = {floors: len(sweeps) for floors, sweeps in groups.items()}
    if len(set(counts.values())) > 1:
        raise ValueError("each floor setting needs one sweep per fold; got "
                         + ", ".join(f"{_show(f)}: {n}" for f, n in counts.items()))
    candidates = []
    for floors, sweeps in groups.items():
        rows = mean_over_folds(sweeps)
        threshold = choose_threshold(rows, max_cost)
        row = next((r for r in rows if r["merge_threshold"] == threshold), None)
        candidates.append({"cluster_floors": list(floors), "chosen_threshold": threshold, "rows": rows,
                           "merged_fraction": row["merged_fraction"] if row else 0.0,
                           "miou": row["miou"] if row else None})
    # The most merging wins; on a tie, the setting listed first (no floors, when given first).
    best = max(candidates, key=lambda c: c["merged_fraction"])
    return {**best, "candidates": [{k: v for k, v in c.items() if k != "rows"} for c in candidates],
            "held_out_frames": frames}


def _show(floors: Sequence[float]) -> str:
    return "floors " + " ".join(f"{v:g}" for v in floors) if floors else "no floors"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clustvit_ros.tools.folds", description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="+", help="one bench --sweep-threshold --json file per held-out drive")
    parser.add_argument("--max-cost", type=float, default=0.5, help="mIoU the default may lose to merging off")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        setting = choose_setting(args.sweeps, args.max_cost)
    except ValueError as exc:
        print(f"folds: error: {exc}", file=sys.stderr)
        return 2
    rows, chosen, floors = setting["rows"], setting["chosen_threshold"], setting["cluster_floors"]
    if args.json:
        print(json.dumps({"held_out_drive_sweep": rows, "chosen_threshold": chosen, "cluster_floors": floors,
                          "candidates": setting["candidates"], "max_cost_miou": args.max_cost,
                          "held_out_sweep_files": list(args.sweeps),
                          "held_out_frames": setting["held_out_frames"]}, indent=1))
        return 0
    if len(setting["candidates"]) > 1:
        for candidate in setting["candidates"]:
            merged = f"{candidate['merged_fraction']:.3f} merged" if candidate["chosen_threshold"] is not None else ""
            print(f"{_show(candidate['cluster_floors'])}: threshold {candidate['chosen_threshold']} {merged}")
        print(f"chosen: {_show(floors)} (the most merging within {args.max_cost} mIoU of merging off); its sweep:")
    print(f"{'threshold':>9} {'mIoU':>6} {'merged':>6} {'GFLOPs x':>8} {'latency x':>9}  per fold")
    for row in rows:
        folds = " ".join(f"{value:5.2f}" for value in row["miou_per_fold"])
        print(f"{row['merge_threshold']:9.2f} {row['miou']:6.2f} {row['merged_fraction']:6.3f} "
              f"{row['gflops_ratio']:8.2f} {row['latency_ratio']:9.2f}  {folds}")
    print(f"chosen default threshold (<= {args.max_cost} mIoU below merging off): {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
