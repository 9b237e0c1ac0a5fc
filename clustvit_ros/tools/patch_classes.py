"""How much of a dataset the cluster module could merge: pure patches per class, per drive.

A token merges only into the cluster of one of the fixed cluster classes
(``clustvit train --cluster-classes``), and it is trained to do so only where its whole
patch carries that class. So the share of patches that are pure patches of those
classes is the most a well-trained module merges on a drive; no threshold gets past it.
This tool counts it on labelled frames at the model's input size (masks resized
nearest-neighbour, like training), per file-name prefix (per drive on CamVid), so the
cluster classes can be chosen for a user's own data, or a merged-fraction target
checked against what the classes allow.

    python -m clustvit_ros.tools.patch_classes --data ../shared/datasets/camvid --split train,val \\
        --input-size 480 640 --cluster-classes Road Sky Building
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from clustvit_ros.model.clustering import homogeneous_patch_classes
from clustvit_ros.tools.arguments import add_frame_selection, at_least_one
from clustvit_ros.tools.data import DatasetError, SegmentationData, compact_mask, frame_prefix, open_dataset


def pure_patch_shares(data: SegmentationData, input_size: tuple[int, int], patch_size: int = 16,
                      every: int = 1) -> dict[str, dict]:
    """Per prefix: {"frames", "patches", "shares": class name -> share of all patches that are
    pure patches of that class}; every ``every``-th frame, masks resized to ``input_size`` (H, W)."""
    height, width = input_size
    if height < patch_size or width < patch_size or every < 1:
        raise ValueError(f"input size {height}x{width} must hold a {patch_size}-pixel patch; every >= 1")
    names = data.class_names
    counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(names) + 1, np.int64))
    frames: dict[str, int] = defaultdict(int)
    for index in range(0, len(data), every):
        mask = compact_mask(data.load(index)[1])
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        patch_class, _ = homogeneous_patch_classes(torch.from_numpy(mask.astype(np.int64))[None],
                                                   patch_size, data.ignore_index)
        # Values past the class ids (the sentinel: mixed or void patches) all count as "none".
        values = patch_class[0].clamp(max=len(names)).numpy()
        prefix = frame_prefix(data.images[index])
        counts[prefix] += np.bincount(values, minlength=len(names) + 1)
        frames[prefix] += 1
    result = {}
    for prefix in sorted(counts):
        total = int(counts[prefix].sum())
        result[prefix] = {"frames": frames[prefix], "patches": total,
                          "shares": {name: float(counts[prefix][i]) / total for i, name in enumerate(names)}}
    return result


def mergeable_share(shares: dict[str, float], cluster_classes: Sequence[str]) -> float:
    """The share of patches that are pure patches of the cluster classes: the merged-fraction ceiling."""
    unknown = [name for name in cluster_classes if name not in shares]
    if unknown:
        raise ValueError(f"unknown class names {unknown}; the dataset's classes are {list(shares)}")
    return float(sum(shares[name] for name in set(cluster_classes)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clustvit_ros.tools.patch_classes",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="dataset root (CamVid or images/ + masks/ + classes.txt)")
    add_frame_selection(parser, "train")
    parser.add_argument("--input-size", nargs=2, type=int, default=(480, 640), metavar=("H", "W"),
                        help="the model's input size the masks are resized to (default 480 640)")
    parser.add_argument("--patch-size", type=at_least_one, default=16)
    parser.add_argument("--every", type=at_least_one, default=1, help="count every n-th frame only")
    parser.add_argument("--cluster-classes", nargs="*", default=(),
                        help="class names that may merge: adds their summed share (the merged-fraction ceiling)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        data = open_dataset(args.data, args.split, include=args.include, exclude=args.exclude,
                            frame_list=args.frame_list)
        per_prefix = pure_patch_shares(data, tuple(args.input_size), args.patch_size, args.every)
        for row in per_prefix.values():
            if args.cluster_classes:
                row["mergeable"] = mergeable_share(row["shares"], args.cluster_classes)
    except (DatasetError, ValueError) as exc:
        print(f"patch_classes: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"input_size": list(args.input_size), "patch_size": args.patch_size,
                          "every": args.every, "cluster_classes": list(args.cluster_classes),
                          "per_prefix": per_prefix}, indent=1))
        return 0
    names = data.class_names
    header = f"{'prefix':<12} {'frames':>6} " + " ".join(f"{name[:9]:>9}" for name in names)
    print("share of all patches that are pure patches of each class" + (
        f"; mergeable = {' + '.join(args.cluster_classes)}" if args.cluster_classes else ""))
    print(header + (f" {'mergeable':>9}" if args.cluster_classes else ""))
    for prefix, row in per_prefix.items():
        line = f"{prefix:<12} {row['frames']:>6} " + " ".join(f"{row['shares'][n]:9.3f}" for n in names)
        print(line + (f" {row['mergeable']:9.3f}" if args.cluster_classes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
