"""Number types for the command lines (clustvit and the benchmarks): a bad value is refused
by argparse with the option's name, before anything loads."""
from __future__ import annotations

import argparse


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def at_least_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 0")
    return value


def above_zero(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text}: must be > 0")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text}: must be in [0, 1]")
    return value


def add_cluster_floors(parser: argparse.ArgumentParser, what: str) -> None:
    """--cluster-floors F ... (one per cluster, in cluster order); 0 for a cluster without one."""
    parser.add_argument("--cluster-floors", type=probability, nargs="+", metavar="P",
                        help=f"{what}: per cluster (in cluster order; a model trained with --cluster-classes "
                             "has them in that order), the least probability a merge into it needs whatever "
                             "the threshold; 0 = none for that cluster. Default: the model's")


def add_frame_selection(parser: argparse.ArgumentParser, split: str, prefix: str = "",
                        what: str = "frames") -> None:
    """--[<prefix>-]split / include / exclude / list: which frames of the data folder to use.

    One definition for every command that reads a dataset (train names two selections, with the
    prefixes ``train`` and ``val``), so the options are spelt and documented the same everywhere.
    The values land in ``split``, ``include``, ``exclude`` and ``frame_list`` (prefixed:
    ``train_split`` ... ``train_list``), the keyword names of ``data.open_dataset``.
    """
    option = f"--{prefix}-" if prefix else "--"
    dest = f"{prefix}_" if prefix else ""
    parser.add_argument(f"{option}split", dest=f"{dest}split", default=split,
                        help=f"split(s) for the {what}, comma-separated (e.g. train,val)")
    parser.add_argument(f"{option}include", dest=f"{dest}include", action="append", default=[],
                        metavar="PATTERN", help="only frames whose file stem matches this shell pattern "
                                                "(e.g. '0006R0_*'); repeatable")
    parser.add_argument(f"{option}exclude", dest=f"{dest}exclude", action="append", default=[],
                        metavar="PATTERN", help="leave out frames whose file stem matches; repeatable")
    parser.add_argument(f"{option}list", dest=f"{dest}list" if prefix else "frame_list",
                        help="text file naming the frames, one per line (a path, file name or stem; "
                             "CamVid's train.txt works)")
